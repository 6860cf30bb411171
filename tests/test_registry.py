import pytest

from mlearn.registry import Registry


def make_registry():
    reg = Registry("widget")

    @reg.register("plain", "alias")
    class Plain:
        def __init__(self, size: int = 1):
            self.size = size

    return reg, Plain


def test_build_and_alias_case_insensitive():
    reg, plain = make_registry()
    assert isinstance(reg.build("PLAIN", size=3), plain)
    assert reg.build("alias").size == 1
    assert reg.names() == ["alias", "plain"]
    assert "Plain" in reg


def test_unknown_name_lists_known():
    reg, _ = make_registry()
    with pytest.raises(KeyError, match=r"unknown widget 'nope'; known: \['alias', 'plain'\]"):
        reg.build("nope")


def test_unknown_kwarg_is_an_error_not_dropped():
    reg, _ = make_registry()
    with pytest.raises(TypeError, match=r"unknown argument\(s\) \['colour'\]; accepted: \['size'\]"):
        reg.build("plain", colour="red")


def test_double_registration_rejected():
    reg, _ = make_registry()
    with pytest.raises(KeyError, match="registered twice"):
        reg.register("plain")(object)
