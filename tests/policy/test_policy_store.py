"""Hot reload: a new policy set replaces the old one whole, or not at all."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from mcp_zero.errors import PolicyError
from mcp_zero.kernel.action import Action, Principal, Verb
from mcp_zero.policy import DEFAULT_POLICY_FILE, PolicyStore, write_default_policies

BOB_CALL = Action(Principal("bob"), Verb.CALL_TOOL, "notes_list", plugin="notes")


def test_reload_puts_new_policies_in_force(tmp_path: Path) -> None:
    write_default_policies(tmp_path)
    store = PolicyStore(tmp_path)
    assert not store.decide(BOB_CALL).allowed
    old_engine = store.engine
    (tmp_path / "bob.cedar").write_text(
        '@id("bob-notes")\n@reason("bob may list notes")\n'
        'permit (principal == Agent::"bob", action, resource == Tool::"notes_list");\n'
    )
    new_engine = store.reload()
    assert store.engine is new_engine is not old_engine
    assert store.generation == 2
    assert store.decide(BOB_CALL).policies == ("bob-notes",)
    # An engine taken before the reload keeps answering with its own set.
    assert not old_engine.decide(BOB_CALL).allowed


def test_a_policy_file_starting_with_a_byte_order_mark_is_put_in_force(tmp_path: Path) -> None:
    # as Notepad saves UTF-8: Cedar took the BOM for a token and refused the file
    write_default_policies(tmp_path)
    store = PolicyStore(tmp_path)
    (tmp_path / "bob.cedar").write_text(
        '@id("bob-notes")\n@reason("bob may list notes")\n'
        'permit (principal == Agent::"bob", action, resource == Tool::"notes_list");\n',
        encoding="utf-8-sig",
    )
    assert store.refresh() is None  # seen once
    assert store.refresh() is not None
    assert store.decide(BOB_CALL).policies == ("bob-notes",)


def test_invalid_reload_keeps_the_old_set(tmp_path: Path) -> None:
    write_default_policies(tmp_path)
    store = PolicyStore(tmp_path)
    before = store.engine
    (tmp_path / "bad.cedar").write_text(
        'permit (principal, action, resource) when { resource.colour == "red" };\n'
    )
    with pytest.raises(PolicyError, match=r"bad\.cedar:1"):
        store.reload()
    assert store.engine is before
    assert store.generation == 1
    assert not store.decide(BOB_CALL).allowed


def test_removing_a_policy_file_takes_effect_on_reload(tmp_path: Path) -> None:
    write_default_policies(tmp_path)
    alice = Action(Principal("alice", frozenset({"notes"})), Verb.CALL_TOOL, "n", plugin="notes")
    store = PolicyStore(tmp_path)
    assert store.decide(alice).allowed
    (tmp_path / DEFAULT_POLICY_FILE).unlink()
    store.reload()
    assert not store.decide(alice).allowed


def test_store_needs_a_valid_directory_to_start(tmp_path: Path) -> None:
    with pytest.raises(PolicyError):
        PolicyStore(tmp_path / "missing")


def test_a_file_being_written_in_place_is_not_put_in_force_half_written(tmp_path: Path) -> None:
    write_default_policies(tmp_path)
    forbid = '@id("no-notes")\nforbid (principal, action, resource == Tool::"n");\n'
    alice = Action(Principal("alice", frozenset({"notes"})), Verb.CALL_TOOL, "n", plugin="notes")
    deny = tmp_path / "deny.cedar"
    deny.write_text(forbid)
    store = PolicyStore(tmp_path)
    assert not store.decide(alice).allowed
    # An editor truncates the file, and writes it again a while later: each poll between
    # reads a different state, none of which is put in force until it reads the same twice.
    deny.write_text("")
    assert store.refresh() is None
    assert not store.decide(alice).allowed  # the forbid holds while the file is empty
    deny.write_text(forbid.replace("no-notes", "no-notes-2"))
    assert store.refresh() is None
    assert store.refresh() is not None
    assert not store.decide(alice).allowed
    assert store.decide(alice).policies == ("no-notes-2",)
    # an empty file that stays empty is a choice: it is put in force on the second read
    deny.write_text("")
    assert store.refresh() is None
    assert store.refresh() is not None
    assert store.decide(alice).allowed


def test_removing_a_broken_file_logs_that_the_set_in_force_is_valid_again(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # the error was logged, and its end was not: the operator could not tell it was over
    caplog.set_level(logging.INFO, logger="mcp_zero.policy")
    write_default_policies(tmp_path)
    store = PolicyStore(tmp_path)
    broken = tmp_path / "broken.cedar"
    broken.write_text("permit (principal, action, resource")
    assert store.changed() is None  # seen once
    with pytest.raises(PolicyError, match=r"broken\.cedar"):
        store.changed()
    assert store.changed() is None  # not reported again
    assert not caplog.records
    broken.unlink()
    assert store.changed() is None  # nothing to put in force: it is in force
    assert store.files_in_force
    assert store.generation == 1
    assert [(r.levelno, r.getMessage()) for r in caplog.records] == [
        (
            logging.INFO,
            f"policy files are valid again: they are the set in force, unchanged ({tmp_path.name})",
        )
    ]
    assert store.changed() is None  # and said once
    assert len(caplog.records) == 1
