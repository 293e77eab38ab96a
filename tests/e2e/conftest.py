import sys
from pathlib import Path

# the harness is imported by name from the e2e tests
sys.path.insert(0, str(Path(__file__).parent))
