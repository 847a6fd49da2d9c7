import pytest

from hpd.common.errors import HpdError
from hpd.pipeline import config

pytestmark = pytest.mark.unit  # seconds, no pipeline run (make test-unit)


def test_overrides_are_typed_and_applied(tmp_path):
    user = tmp_path / "run.toml"
    user.write_text('[score]\ntop_k = 16\n[generate]\nmode = "teacher"\n')
    cfg = config.load(user, ["score.temperature=2", "run.name=exp1", "teacher.path=/models/x"])
    assert cfg.score.top_k == 16
    assert cfg.score.temperature == 2.0 and isinstance(cfg.score.temperature, float)
    assert cfg.generate.mode == "teacher"
    assert cfg.run.name == "exp1" and cfg.teacher.path == "/models/x"


def test_dumps_round_trips(tmp_path):
    cfg = config.load(None, ['generate.prompts=with "quotes" and \\ backslash'])
    path = tmp_path / "c.toml"
    path.write_text(config.dumps(cfg))
    assert config.load(path) == cfg


@pytest.mark.parametrize(
    "override, message",
    [
        ("score.top_kk=3", "unknown config key score.top_kk"),
        ("nosuch.key=3", "unknown config section [nosuch]"),
        ("score.top_k=many", "score.top_k must be a int"),
        ("score_top_k", "SECTION.KEY=VALUE"),
    ],
)
def test_bad_overrides_are_rejected(override, message):
    with pytest.raises(HpdError, match=message.replace("[", r"\[").replace("]", r"\]")):
        config.load(None, [override])


@pytest.mark.parametrize("name", ["../../escaped", "/abs/path", "", "a/b", ".hidden", "..", "x" * 101, "sp ace"])
def test_run_names_are_plain_names_never_paths(name):
    with pytest.raises(HpdError, match="is not a plain run name; use letters, digits and -_."):
        config.load(None, [f"run.name={name!r}".replace("'", '"')])
    with pytest.raises(HpdError, match="teachers.runs entry"):
        config.load(None, [f'teachers.runs="ok,{name or "a/b"}"'])


def test_missing_and_malformed_config_files(tmp_path):
    with pytest.raises(HpdError, match="does not exist"):
        config.load(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[score\n")
    with pytest.raises(HpdError, match="not valid TOML"):
        config.load(bad)
