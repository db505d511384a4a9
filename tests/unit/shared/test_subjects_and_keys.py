from __future__ import annotations

import pytest

from shared.settings import CommonSettings
from shared.storage import UnsafeKey, safe_key, safe_name
from shared.subjects import Namespace


def test_namespace_names_subjects_streams_and_dead_letters():
    ns = Namespace("tuneloop")
    assert ns.subject("dataset.ready") == "tuneloop.dataset.ready"
    assert ns.stream == "TUNELOOP"
    assert ns.dead_letter("dataset.ready") == "tuneloop-dlq.dataset.ready"
    assert ns.dead_letter_stream == "TUNELOOP_DLQ"
    # the dead letters are outside the pipeline stream's subject space
    assert not ns.dead_letter("x").startswith(ns.all_subjects[:-1])


@pytest.mark.parametrize("prefix", ["", "a.b", "a b", "a>", "*"])
def test_bad_prefixes_are_refused(prefix):
    with pytest.raises(ValueError, match="prefix"):
        Namespace(prefix)


@pytest.mark.parametrize(
    "key", ["../x", "a/../../b", "/abs", "a//b", "a\\b", "a/./b", "", "x\x00y", "a" * 2000]
)
def test_unsafe_keys_are_refused(key):
    with pytest.raises(UnsafeKey):
        safe_key(key)


def test_names_are_flattened_to_one_segment():
    assert safe_name("../../etc/passwd") == "_.._etc_passwd"
    with pytest.raises(UnsafeKey):
        safe_name("..")


def test_default_admin_key_is_refused_outside_dev_mode(monkeypatch):
    monkeypatch.setenv("TUNELOOP_DEV_MODE", "false")
    with pytest.raises(ValueError, match="TUNELOOP_ADMIN_KEY"):
        CommonSettings()
    monkeypatch.setenv("TUNELOOP_ADMIN_KEY", "a-real-secret")
    assert CommonSettings().admin_key.get_secret_value() == "a-real-secret"
