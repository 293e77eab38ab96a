"""The live-state model without sockets: edits validated whole and applied whole,
every change recorded with its source and published, members found by name."""

from __future__ import annotations

import pytest

from twistproxy.balancer import Balancer
from twistproxy.config import loads
from twistproxy.runtime import Edit, Invalid, Runtime


def runtime(members: str = "", params: str = "") -> Runtime:
    cfg = loads(f"""
[[listen]]
address = "127.0.0.1"
port = 8080
[[vhost]]
server_name = "x"
  [[vhost.route]]
  path = "/"
  url = "balancer://farm/"
[balancer.farm]
{params}
  [[balancer.farm.member]]
  url = "http://10.0.0.1:8101/"
  route = "n1"
  [[balancer.farm.member]]
  url = "http://10.0.0.2:8102/app"
  route = "n2"
{members}
""")
    return Runtime(Balancer(b) for b in cfg.balancers.values())


def recorder(rt: Runtime) -> list:
    seen: list = []
    rt.subscribe(seen.append)
    return seen


def test_members_are_found_by_url_as_written_or_by_route():
    rt = runtime()
    n2 = rt.member("farm", "http://10.0.0.2:8102/app")
    assert rt.member("farm", "n2") is n2 and rt.member("farm", "http://10.0.0.2:8102/app/") is n2
    with pytest.raises(Invalid, match="is not a member of balancer://farm"):
        rt.member("farm", "http://10.9.9.9/")
    with pytest.raises(Invalid, match="is not a balancer"):
        rt.balancer("nope")


def test_a_batch_is_applied_whole_and_published_once_with_who_made_it():
    rt = runtime()
    seen = recorder(rt)
    changes = rt.apply([Edit("farm", "loadfactor", "3", member="n1"),
                        Edit("farm", "status.N", "1", member="n2"),
                        Edit("farm", "lbmethod", "bybusyness")],
                       source="manager", who="127.0.0.1 admin")
    assert [(c.member, c.field, c.old, c.new) for c in changes] == [
        ("http://10.0.0.1:8101", "loadfactor", 1.0, 3.0),
        ("http://10.0.0.2:8102/app", "status.N", False, True),
        (None, "lbmethod", "byrequests", "bybusyness")]
    assert seen == [changes] and {c.source for c in changes} == {"manager"}
    assert changes[0].who == "127.0.0.1 admin"
    b = rt.balancer("farm")
    assert b.members[0].lbfactor == 300 and "N" in b.members[1].flags
    assert b.lbmethod == "bybusyness"


@pytest.mark.parametrize("edit,field", [
    (Edit("farm", "loadfactor", "0", member="n1"), "loadfactor"),
    (Edit("farm", "loadfactor", "101", member="n1"), "loadfactor"),
    (Edit("farm", "lbset", "100", member="n1"), "lbset"),
    (Edit("farm", "lbset", "1.5", member="n1"), "lbset"),
    (Edit("farm", "status.D", "2", member="n1"), "status.D"),
    (Edit("farm", "route", "a b", member="n1"), "route"),
    (Edit("farm", "lbmethod", "roundrobin"), "lbmethod"),
    (Edit("farm", "maxattempts", "-1"), "maxattempts"),
    (Edit("farm", "timeout", "x"), "timeout"),
    (Edit("farm", "colour", "red"), "colour"),
    (Edit("farm", "status.Z", "1", member="n1"), "status.Z"),
])
def test_one_bad_edit_changes_nothing_and_names_its_field(edit, field):
    rt = runtime()
    seen = recorder(rt)
    before = [(m.lbfactor, set(m.flags), m.route, m.lbset) for m in rt.balancer("farm").members]
    with pytest.raises(Invalid) as e:
        rt.apply([Edit("farm", "loadfactor", "7", member="n2"), edit], source="manager")
    assert e.value.field == field
    after = [(m.lbfactor, set(m.flags), m.route, m.lbset) for m in rt.balancer("farm").members]
    assert after == before and seen == [], "half applied"


def test_setting_what_is_already_there_is_no_change():
    rt = runtime()
    seen = recorder(rt)
    assert rt.apply([Edit("farm", "loadfactor", 1, member="n1")], source="manager") == []
    assert seen == []


def test_drain_keeps_sticky_requests_and_takes_no_new_ones():
    rt = runtime(params='stickysession = "ROUTEID"')
    b = rt.balancer("farm")
    rt.apply([Edit("farm", "status.N", 1, member="n2")], source="manager")
    assert {b.choose("/", None, 0).member.route for _ in range(6)} == {"n1"}
    assert b.choose("/", "ROUTEID=.n2", 0).member.route == "n2"


def test_lbset_and_lbmethod_changes_take_effect_on_the_next_choice():
    rt = runtime()
    b = rt.balancer("farm")
    rt.apply([Edit("farm", "lbset", 1, member="n1")], source="manager")
    assert {b.choose("/", None, 0).member.route for _ in range(4)} == {"n2"}
    rt.apply([Edit("farm", "stickysession", "JSESSIONID|jsessionid")], source="manager")
    assert b.sticky_cookie == "JSESSIONID" and b.sticky_param == "jsessionid"


def test_error_state_and_its_end_are_published_as_changes():
    rt = runtime('  retry = 5\n')
    seen = recorder(rt)
    b = rt.balancer("farm")
    n1 = b.members[0]
    assert rt.mark_error(n1, 100.0, "connection refused") is True
    assert rt.mark_error(n1, 101.0, "again") is False        # already in error
    assert seen[-1][0].field == "status.E" and seen[-1][0].source == "failover"
    assert seen[-1][0].who == "connection refused"
    n1_retry = n1.config.worker.retry
    for _ in range(3):
        b.choose("/", None, 100.0 + n1_retry + 1)               # retry has passed
    assert seen[-1][0].source == "retry" and seen[-1][0].new is False
    assert n1.error_seconds >= n1_retry


def test_errors_are_ignored_with_status_i():
    rt = runtime()
    n1 = rt.member("farm", "n1")
    rt.apply([Edit("farm", "status.I", 1, member="n1")], source="manager")
    assert rt.mark_error(n1, 0.0, "refused") is False and "E" not in n1.flags


# -- members added at runtime (the manager's b_nwrkr) and the state file ------------------

def test_added_member_starts_disabled_and_takes_a_growth_slot():
    rt = runtime(params="growth = 1")
    seen = recorder(rt)
    (c,) = rt.apply([Edit("farm", "add_member", "http://10.0.0.3:8103")], source="manager",
                    who="127.0.0.1 -")
    assert (c.field, c.member, c.new) == ("add_member", "http://10.0.0.3:8103",
                                          "http://10.0.0.3:8103")
    m = rt.member("farm", "http://10.0.0.3:8103")
    assert "D" in m.flags and not m.usable() and seen == [[c]]
    with pytest.raises(Invalid, match="needs a free slot"):
        rt.apply([Edit("farm", "add_member", "http://10.0.0.4:8104")], source="manager")
    assert len(rt.balancer("farm").members) == 3


@pytest.mark.parametrize("url, why", [("http://10.0.0.1:8101/", "already a member"),
                                      ("ftp://10.0.0.5/", "is not an http"),
                                      ("http://10.0.0.5:8105", "needs a free slot")])
def test_add_member_refused_changes_nothing(url, why):
    rt = runtime(params="growth = 0" if "slot" in why else "growth = 3")
    seen = recorder(rt)
    with pytest.raises(Invalid, match=why):
        rt.apply([Edit("farm", "loadfactor", 5, member="n1"), Edit("farm", "add_member", url)],
                 source="manager")
    assert len(rt.balancer("farm").members) == 2 and seen == []
    assert rt.member("farm", "n1").lbfactor == 100


def test_two_adds_in_one_batch_count_against_growth_together():
    rt = runtime(params="growth = 1")
    with pytest.raises(Invalid, match="needs a free slot"):
        rt.apply([Edit("farm", "add_member", "http://10.0.0.3:1"),
                  Edit("farm", "add_member", "http://10.0.0.4:1")], source="manager")
    assert len(rt.balancer("farm").members) == 2


def test_state_file_round_trip_restores_manager_changes(tmp_path):
    from twistproxy.admin import persist
    rt = runtime(params="growth = 2")
    rt.apply([Edit("farm", "status.N", 1, member="n1"), Edit("farm", "loadfactor", 7, member="n2"),
              Edit("farm", "lbmethod", "bybusyness"), Edit("farm", "add_member", "http://10.0.0.9:1")],
             source="manager")
    rt.apply([Edit("farm", "lbset", 3, member="http://10.0.0.9:1")], source="manager")
    path = str(tmp_path / "state.json")
    persist.save(path, rt)
    assert not [p for p in tmp_path.iterdir() if p.name != "state.json"]   # no temp left
    fresh = runtime(params="growth = 2")
    seen = recorder(fresh)
    n, why = persist.restore(path, fresh)
    assert why is None and n == 5
    assert {c.source for batch in seen for c in batch} == {"state-file"}
    assert fresh.member("farm", "n1").flags == {"N"}
    assert fresh.member("farm", "n2").lbfactor == 700
    assert fresh.balancer("farm").lbmethod == "bybusyness"
    added = fresh.member("farm", "http://10.0.0.9:1")
    assert added.flags == {"D"} and added.lbset == 3


@pytest.mark.parametrize("member, fields, why", [
    ("http://10.9.9.9:1", '{"loadfactor": 3}', "no longer in the configuration"),
    ("http://10.0.0.1:8101/", '{"loadfactor": 300}', "loadfactor"),
], ids=["member-no-longer-configured", "value-out-of-range"])
def test_state_file_that_no_longer_matches_is_ignored_whole(tmp_path, member, fields, why):
    from twistproxy.admin import persist
    path = tmp_path / "state.json"
    path.write_text('{"version": 1, "balancers": {"farm": {"settings": {"lbmethod": '
                    f'"bytraffic"}}, "added": [], "members": {{"{member}": {fields}}}}}}}}}')
    rt = runtime()
    seen = recorder(rt)
    n, reason = persist.restore(str(path), rt)
    assert n == 0 and why in reason
    assert rt.balancer("farm").lbmethod == "byrequests" and seen == []
