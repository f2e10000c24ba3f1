"""hf_softmask as an installed package: the wheel's contents, the ``hf-softmask`` command from a fresh environment,
online by default, declared dependencies, optional extras that say which extra is missing."""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
import time
import zipfile
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest

from tests.testing_utils import accelerate_launch_cmd, tiny_runner_flags

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
STORED_HELP = {"pretrain": "continual_pretrain", "finetune": "continual_finetune", "compare": "compare_strategies"}


def _clean_env(**extra) -> dict:
    """This environment without PYTHONPATH (so only an installed hf_softmask can be imported), with ``extra``."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "ACCELERATE_USE_CPU")}
    env.update(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", **extra)
    return env


def _run(cmd, cwd, env, timeout=300):
    proc = subprocess.run(list(map(str, cmd)), cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{cmd}:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


def _text_domains(directory: Path) -> str:
    """Two domains of 16 plain-text files each: ``--domains`` in the runner's 'name=/dir' form."""
    words = {
        "markets": "shares bonds traders rates profit quarter bank inflation".split(),
        "football": "goal match striker league coach season penalty keeper".split(),
    }
    for name, vocab in words.items():
        (directory / name).mkdir(parents=True)
        for i in range(16):
            sentence = " ".join(vocab[(i + j) % len(vocab)] for j in range(40))
            (directory / name / f"{i:02d}.txt").write_text(f"Report {i}. {sentence}. The {vocab[i % 8]} story.")
    return ",".join(f"{name}={directory / name}" for name in words)


def _build_wheel(tmp: Path) -> Path:
    """``pip wheel`` of a copy of the sources (the build writes build/ and *.egg-info beside them)."""
    import shutil

    src = tmp / "src"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(ROOT / "hf_softmask", src / "hf_softmask", ignore=ignore)  # follows the configs link
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, src / name)
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", tmp / "dist", src]
    _run(cmd, tmp, _clean_env())
    (wheel,) = (tmp / "dist").glob("hf_softmask-*.whl")
    return wheel


@pytest.mark.slow
@pytest.mark.distributed
def test_wheel_installed_in_a_fresh_venv_runs_the_commands(tmp_path, tiny_mlm_dir):
    wheel = _build_wheel(tmp_path)
    names = zipfile.ZipFile(wheel).namelist()
    for part in STORED_HELP.values():
        assert f"hf_softmask/continual/help/{part}.txt" in names
    for f in ("py.typed", "configs/default.yaml", "configs/finetune_default.yaml", "configs/accelerate/fsdp.yaml"):
        assert f"hf_softmask/{f}" in names
    assert "hf_softmask/metrics/accuracy/accuracy.py" in names and "hf_softmask/__main__.py" in names
    info = next(n.rsplit("/", 1)[0] for n in names if n.endswith(".dist-info/METADATA"))
    assert f"{info}/licenses/LICENSE" in names
    metadata = zipfile.ZipFile(wheel).read(f"{info}/METADATA").decode()
    assert "License-Expression: Apache-2.0" in metadata and "Requires-Dist: numpy" in metadata
    assert re.search(r"Requires-Dist: matplotlib\S*\s*; extra == .plots.", metadata)
    entry_points = zipfile.ZipFile(wheel).read(f"{info}/entry_points.txt").decode()
    assert "hf-softmask = hf_softmask.command_line:main" in entry_points

    # torch, transformers, ... from this Python; hf_softmask only from the wheel (never from the checkout).
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", venv], tmp_path, _clean_env())
    python, command = venv / "bin" / "python", venv / "bin" / "hf-softmask"
    work = tmp_path / "work"  # outside the checkout
    work.mkdir()
    env = _clean_env()
    _run([python, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--ignore-installed", wheel], work, env)
    probe = "import sys, hf_softmask; print(hf_softmask.__file__, hf_softmask.__version__, 'torch' in sys.modules)"
    where, version, torch_loaded = _run([python, "-c", probe], work, env).stdout.split()
    assert Path(where).resolve().is_relative_to(venv.resolve()), where
    assert version == PYPROJECT["project"]["version"] and torch_loaded == "False"

    for name, stored in STORED_HELP.items():  # complete and fast: the stored text, no torch import
        t0 = time.perf_counter()
        out = _run([command, name, "--help"], work, env).stdout
        assert time.perf_counter() - t0 < 5, f"hf-softmask {name} --help took {time.perf_counter() - t0:.1f} s"
        assert out == (ROOT / "hf_softmask" / "continual" / "help" / f"{stored}.txt").read_text()
        assert out.startswith(f"usage: hf-softmask {name} ")
    assert "already satisfied" in _run([command, "assets", "--install"], work, env).stdout  # pins met: no download
    code = "from hf_softmask.utils.package_data import config_file; print(config_file('configs/default.yaml'))"
    shipped = _run([python, "-c", code], work, env)
    assert Path(shipped.stdout.strip()).resolve().is_relative_to(venv.resolve())

    # Online by default (HF_HUB_OFFLINE unset; a Hub endpoint that refuses connections): a local model needs no Hub.
    domains = _text_domains(tmp_path / "texts")
    flags = tiny_runner_flags(tiny_mlm_dir, work / "one", domains=domains, max_steps=2, save_steps=2, logging_steps=1)
    online = {k: v for k, v in _clean_env(HF_ENDPOINT="http://127.0.0.1:9").items() if k != "HF_HUB_OFFLINE"}
    one = _run([python, "-m", "hf_softmask", "pretrain", *flags], work, online)
    results = json.loads((work / "one" / "results.json").read_text())
    assert results["domains"] == ["markets", "football"]
    assert results["forgetting"] is not None and "done: in-domain loss" in one.stdout

    # accelerate launch -m hf_softmask: two gloo processes in one group (the runner refuses a launch whose
    # processes did not join), each on half of every global batch: the same 2 steps cover twice the epoch.
    launch = [python, *accelerate_launch_cmd(2)[1:]]
    flags = tiny_runner_flags(tiny_mlm_dir, work / "two", domains=domains, max_steps=2, save_steps=2, logging_steps=1)
    two = _run([*launch, "-m", "hf_softmask", "pretrain", *flags], work, _clean_env(HF_HUB_OFFLINE="1"), timeout=500)
    assert json.loads((work / "two" / "results.json").read_text())["domains"] == ["markets", "football"]
    assert two.stdout.count("done: in-domain loss") == 1  # the summary line from the main process only
    epoch = [float(re.findall(r"'epoch': '([0-9.]+)'", run.stdout)[0]) for run in (one, two)]
    assert epoch[1] == pytest.approx(2 * epoch[0]), epoch


class _NoSuchRepoHub:
    """A local stand-in for the Hub that answers every request 404 (a repository that does not exist) and records
    the paths asked for: a lookup needs no network and is not retried (a refused connection is, for ~25 s)."""

    def __init__(self):
        import http.server
        import threading

        seen = self.paths = []

        class Handler(http.server.BaseHTTPRequestHandler):
            def _404(self):
                seen.append(self.path)
                self.send_response(404)
                self.send_header("Content-Length", "0")
                self.end_headers()

            do_GET = do_HEAD = _404

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def test_hub_id_is_looked_up_on_the_hub_by_default(tmp_path):
    """Without HF_HUB_OFFLINE a Hub id goes to the Hub (here a local endpoint that knows no repository, so the test
    needs no network and downloads nothing); the runner used to set HF_HUB_OFFLINE=1 and refuse it as offline."""
    hub = _NoSuchRepoHub()
    env = {k: v for k, v in _clean_env().items() if k != "HF_HUB_OFFLINE"}
    env.update(PYTHONPATH=str(ROOT), HF_ENDPOINT=hub.url, HF_HOME=str(tmp_path / "hf_home"))
    flags = tiny_runner_flags("Qwen/Qwen2.5-0.5B", tmp_path / "out", domains="business", max_steps=1)
    try:
        proc = subprocess.run(
            [sys.executable, ROOT / "scripts" / "continual_pretrain.py", *flags],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
    finally:
        hub.close()
    assert proc.returncode != 0
    assert "HF_HUB_OFFLINE" not in proc.stderr, proc.stderr[-2000:]  # no offline refusal
    assert any("Qwen/Qwen2.5-0.5B" in path for path in hub.paths), (hub.paths, proc.stderr[-2000:])


def test_offline_uses_a_cached_hub_id_and_names_the_fix_for_an_uncached_one(tmp_path, tiny_mlm_dir):
    """HF_HUB_OFFLINE=1 (the user's choice): a Hub id in the cache loads; one not in it is refused, saying how to
    download it."""
    import shutil

    repo = tmp_path / "hub" / "models--someone--tiny-mlm"
    commit = "0" * 40
    shutil.copytree(tiny_mlm_dir, repo / "snapshots" / commit)  # the cache layout huggingface_hub writes
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    code = (
        "from hf_softmask.utils.assets import check_model_source as c\n"
        "from transformers import AutoConfig\n"
        "c('someone/tiny-mlm'); print(AutoConfig.from_pretrained('someone/tiny-mlm').model_type)\n"
        "try:\n    c('someone/not-cached')\nexcept FileNotFoundError as e:\n    print(e)\n"
    )
    env = _clean_env(PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(tmp_path / "hub"))
    out = _run([sys.executable, "-c", code], tmp_path, env).stdout.splitlines()
    assert out[0] == "bert"
    assert "someone/not-cached" in out[1] and "unset HF_HUB_OFFLINE" in out[1]


def _declared() -> set[str]:
    spec = [*PYPROJECT["project"]["dependencies"]]
    spec += [d for group in PYPROJECT["project"]["optional-dependencies"].values() for d in group]
    return {re.split(r"[<>=!~\[; ]", d, maxsplit=1)[0].lower().replace("_", "-") for d in spec}


def test_every_imported_package_is_declared():
    """Each third-party module the package imports belongs to a distribution pyproject.toml declares (numpy was
    imported and not declared)."""
    modules = set()
    for path in (ROOT / "hf_softmask").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                modules |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                modules.add(node.module.split(".")[0])
    third_party = sorted(m for m in modules - set(sys.stdlib_module_names) if m not in ("hf_softmask", "__future__"))
    dists = packages_distributions()
    undeclared = [m for m in third_party if not {d.lower().replace("_", "-") for d in dists[m]} & _declared()]
    assert not undeclared, f"imported but not in pyproject.toml: {undeclared}"
    assert {"numpy", "matplotlib"} <= set(third_party)
    torch_floor = next(d for d in PYPROJECT["project"]["dependencies"] if d.startswith("torch"))
    ci = (ROOT / ".ci" / "run").read_text()
    assert f"torch=={torch_floor.split('>=')[1]}" in ci or f"torch=={torch_floor.split('>=')[1]}.0" in ci


def test_assets_are_pinned_in_one_place(capsys):
    """README and .ci/run install the shipped assets through ``hf-softmask assets --install``; the pins live only in
    hf_softmask.utils.assets, and the installed assets are those pins."""
    from importlib.metadata import version

    from hf_softmask.command_line import main
    from hf_softmask.utils.assets import ASSET_PINS

    assert main(["assets"]) == 0
    printed = capsys.readouterr().out.split()
    assert printed[:5] == ["python", "-m", "pip", "install", "--no-deps"]
    assert printed[5:] == [f"{name}=={v}" for name, v in ASSET_PINS.items()]
    assert {name: version(name) for name in ASSET_PINS} == ASSET_PINS
    for doc in ("README.md", ".ci/run"):
        text = (ROOT / doc).read_text()
        assert "hf_softmask assets --install" in text or "hf-softmask assets --install" in text, doc
        assert not any(name in text and f"{name}==" in text for name in ASSET_PINS), f"{doc} repeats the pins"


def test_readme_and_ci_run_the_same_test_command():
    """README's test command is what .ci/run runs, and what it needs (pytest-xdist for ``-n``) is in the test
    extra."""
    import shlex

    def pytest_args(text: str) -> list[str]:
        line = next(x for x in text.splitlines() if "python -m pytest" in x and not x.lstrip().startswith("#"))
        return shlex.split(line[line.index("python -m pytest") :])

    readme, ci = (pytest_args((ROOT / doc).read_text()) for doc in ("README.md", ".ci/run"))
    assert readme == ci, (readme, ci)
    extra = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["test"]
    if "-n" in ci:
        assert any(dep.startswith("pytest-xdist") for dep in extra), extra


def test_a_missing_extra_is_named_and_plots_can_be_turned_off(tmp_path):
    """Without matplotlib (the 'plots' extra) or gguf (the 'gguf' extra): the runners import and refuse --plots
    at start naming the extra and --no_plots; --no_plots runs; SmolLM2 names the gguf extra."""
    code = f"""
import sys
sys.modules["matplotlib"] = None  # as if not installed
sys.modules["gguf"] = None
from hf_softmask.continual import parse_config
from hf_softmask.continual.finetuning import parse_finetuning_config
from hf_softmask.utils.assets import load_smollm2
out = {str(tmp_path)!r}
for parse in (parse_config, parse_finetuning_config):
    try:
        parse(["--output_dir", out])
    except ImportError as e:
        print(e)
    parse(["--output_dir", out, "--no_plots"])
try:
    import hf_softmask.evaluation.plotting
except ImportError as e:
    print(e)
try:
    load_smollm2()
except ImportError as e:
    print(e)
"""
    out = _run([sys.executable, "-c", code], tmp_path, _clean_env(PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1"))
    lines = out.stdout.splitlines()
    assert len(lines) == 4, out.stdout
    for line in lines[:3]:
        assert "pip install 'hf_softmask[plots]'" in line
    assert "--no_plots" in lines[0] and "--no_plots" in lines[1]
    assert "pip install 'hf_softmask[gguf]'" in lines[3]


def test_help_of_every_command_is_stored_and_current():
    """``hf-softmask <command> --help`` prints package data; it must be what the parsers print."""
    from hf_softmask.continual.cli import help_texts

    texts = help_texts()
    for stored in STORED_HELP.values():
        path = ROOT / "hf_softmask" / "continual" / "help" / f"{stored}.txt"
        assert path.read_text() == texts[stored], "stale: python -m hf_softmask.continual.cli"


def test_shipped_config_by_name_from_any_directory(tmp_path, monkeypatch):
    from hf_softmask.continual import parse_config

    monkeypatch.chdir(tmp_path)  # no configs/ here
    a = parse_config(["--config", "configs/default.yaml", "--output_dir", "x", "--no_plots"])
    b = parse_config(["--config", "default", "--output_dir", "x", "--no_plots"])
    assert a.model_name_or_path == b.model_name_or_path == "minilm" and a.max_steps == b.max_steps == 30
    with pytest.raises(FileNotFoundError, match="shipped: .*default"):
        parse_config(["--config", "nonesuch.yaml", "--output_dir", "x"])
