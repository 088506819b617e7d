"""The ``dpdm`` command through Typer's CliRunner: run (dry and a tiny real run), plugins, recover, sample.

User errors must exit 1 with one message and no traceback; the tiny real run (a few seconds on one CPU thread)
must leave a complete run directory behind and ``runs/latest`` pointing at it.
"""

from __future__ import annotations

import importlib.metadata
import json
import math
import os
import re
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from dpdm.cli.main import app
from dpdm.core.io.checkpoint import read_checkpoint
from dpdm.core.config.recipe import Recipe, load_recipe
from dpdm.core.config.structure import dump_yaml, load_yaml_text, structure, unstructure

torch.set_num_threads(1)

TOY2D = str(Path(__file__).resolve().parent.parent / "recipes" / "toy2d.yaml")
TINY = [
    "teacher.train.steps=60", "train.steps=20", "train.fake_updates=1", "eval.num_samples=300",
    "eval.recovery_num=300", "eval.teacher_nfe=[1,2,3]", "eval.student_steps=[1,2]",
    "eval.one_step_sigma_max=[80.0,2.5]", "model.backbone.hidden=32", "model.backbone.depth=1",
]
PNG = b"\x89PNG\r\n\x1a\n"
WIDE = {"COLUMNS": "1000"}  # rich wraps at the terminal width; keep messages on one line


def invoke(*args, env=None):
    return CliRunner().invoke(app, [str(a) for a in args], env={**WIDE, **(env or {})})


def sets(overrides):
    return [part for o in overrides for part in ("--set", o)]


def ok(result):
    assert result.exit_code == 0, (result.exit_code, result.output, result.exception)
    return result


def user_error(result) -> str:
    """The stderr of a command that failed cleanly: exit 1 through typer.Exit, no traceback."""
    assert result.exit_code == 1, (result.exit_code, result.output)
    assert isinstance(result.exception, SystemExit), result.exception  # not a crash
    assert "Traceback" not in result.output
    assert result.stdout == ""
    assert result.stderr.startswith("error: ")
    return result.stderr


def squash(text: str) -> str:
    return " ".join(text.split())


# --- run --dry-run and recipe errors ---------------------------------------------------------------------------


def test_help():
    r = ok(invoke("--help"))
    for command in ("run", "recover", "sample", "plugins"):
        assert command in r.stdout


def test_dry_run_prints_the_resolved_recipe(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    r = ok(invoke("run", TOY2D, "--dry-run"))
    assert r.stdout == dump_yaml(unstructure(load_recipe(TOY2D)))
    assert structure(Recipe, load_yaml_text(r.stdout, "stdout")) == load_recipe(TOY2D)
    assert "student_sampler:\n    name: dpdm\n" in r.stdout  # defaults are filled in
    assert r.stderr == f"recipe {TOY2D} is valid\n"
    assert os.listdir(tmp_path) == []  # nothing was run


def test_dry_run_with_overrides(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    r = ok(invoke("run", TOY2D, "--dry-run", "--set", "train.lr=2e-5", "--set", "eval.teacher_nfe=[1,3]"))
    resolved = structure(Recipe, load_yaml_text(r.stdout, "stdout"))
    assert resolved.train.lr == 2e-5 and type(resolved.train.lr) is float
    assert resolved.eval.teacher_nfe == [1, 3]
    assert resolved == load_recipe(TOY2D, ["train.lr=2e-5", "eval.teacher_nfe=[1,3]"])


def test_dry_run_output_is_yaml_even_on_a_narrow_terminal(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    name = "n" * 130
    r = ok(invoke("run", TOY2D, "--dry-run", "--set", f"name={name}", "--set", "data.name=gaussian-ring",
                  env={"COLUMNS": "80"}))
    assert f"name: {name}\n" in r.stdout  # not wrapped
    assert structure(Recipe, load_yaml_text(r.stdout, "stdout")).name == name


def test_bad_override_value(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    err = user_error(invoke("run", TOY2D, "--set", "train.lr=abc"))
    assert err == f"error: invalid recipe {TOY2D} (1 problem):\n  - recipe.train.lr: expected float, got 'abc'\n"
    assert not (tmp_path / "runs").exists()


def test_error_messages_are_printed_verbatim_not_as_markup(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    err = user_error(invoke("run", TOY2D, "--dry-run", "--set", "eval.teacher_nfe=3", "--set", "name=[bold]"))
    assert err == (f"error: invalid recipe {TOY2D} (2 problems):\n"
                   "  - recipe.name: expected str, got ['bold']\n"
                   "  - recipe.eval.teacher_nfe: expected list[int], got 3\n")


def test_several_recipe_problems_at_once(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    err = user_error(invoke("run", TOY2D, "--dry-run", "--set", "train.stepz=3",
                            "--set", "eval.teacher_samplers=[heum]"))
    assert err.splitlines() == [
        f"error: invalid recipe {TOY2D} (2 problems):",
        "  - recipe.train.stepz: unknown key. Did you mean 'steps'? Valid keys: divergence, sigma, steps, "
        "batch_size, lr, betas, fake_lr, fake_updates, order, student_dropout, ema_halflife_nimg, grad_clip, lr_warmup_nimg, fake_lora, student_lora, student.",
        "  - recipe.eval.teacher_samplers[0].name: unknown sampler 'heum'. Did you mean 'heun'? Registered samplers: "
        "dpdm, dpmpp-2m, euler, euler-stochastic, heun. Run `dpdm plugins` to see every component and the package "
        "that provides it.",
    ]


def test_dry_run_builds_every_component(tmp_path, monkeypatch):
    """Values that only the components can judge fail at --dry-run, all at once, before any training."""
    monkeypatch.chdir(tmp_path)
    err = user_error(invoke("run", TOY2D, "--dry-run", *sets([
        "train.steps=-1", "model.backbone.activation=foo", "train.divergence.weighting=bar",
        "eval.student_schedule={name: dpdm, sigma_min: 1.0, sigma_max: 0.5}", "eval.recovery_sigmas=[0,1]"])))
    assert err.splitlines() == [
        f"error: invalid recipe {TOY2D} (5 problems):",
        "  - recipe.train.steps: must be at least 0, got -1",
        "  - recipe.eval.recovery_sigmas: every entry must be positive, got [0.0, 1.0]",
        "  - recipe.model: unknown activation 'foo'; choose one of ['gelu', 'relu', 'silu', 'tanh']",
        "  - recipe.train.divergence: unknown weighting 'bar'; choose one of diffusion, edm, score",
        "  - recipe.eval.student_schedule: need 0 < sigma_min <= sigma_max, got sigma_min=1.0, sigma_max=0.5",
    ]
    assert not (tmp_path / "runs").exists()


def test_missing_recipe_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    err = user_error(invoke("run", "nope.yaml"))
    assert err == "error: invalid recipe nope.yaml (1 problem):\n  - recipe file 'nope.yaml' not found\n"
    assert not (tmp_path / "runs").exists()


def test_malformed_recipe_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "bad.yaml").write_text("name: x\ntrain: {lr: 1\n")
    err = user_error(invoke("run", "bad.yaml"))
    assert err.splitlines()[0] == "error: invalid recipe bad.yaml (1 problem):"
    assert err.splitlines()[1].startswith("  - recipe file 'bad.yaml' is not valid YAML at line 3, column 1: ")
    assert not (tmp_path / "runs").exists()


# --- plugins -----------------------------------------------------------------------------------------------------


def test_plugins_json():
    r = ok(invoke("plugins", "--json"))
    data = json.loads(r.stdout)
    assert list(data) == ["backbone", "preconditioning", "schedule", "sampler", "divergence", "dataset", "metric"]
    core, nets = importlib.metadata.version("dpdm-core"), importlib.metadata.version("dpdm-nets")
    samplers = {e["name"]: e for e in data["sampler"]}
    assert samplers["heun"] == {"name": "heun", "distribution": "dpdm-core", "version": core, "plugin": "core"}
    backbones = {e["name"]: e for e in data["backbone"]}
    assert backbones["mlp"] == {"name": "mlp", "distribution": "dpdm-nets", "version": nets, "plugin": "nets"}
    assert {e["name"]: e["distribution"] for e in data["dataset"]}["gaussian-ring"] == "dpdm-data"
    assert [e["name"] for e in data["sampler"]] == ["dpdm", "dpmpp-2m", "euler", "euler-stochastic", "heun"]


def test_plugins_table():
    r = ok(invoke("plugins"))
    rows = [squash(line.replace("|", " ")) for line in r.stdout.splitlines()]  # piped: Markdown tables
    core = importlib.metadata.version("dpdm-core")
    assert f"sampler heun dpdm-core {core} core" in rows
    assert f"backbone mlp dpdm-nets {importlib.metadata.version('dpdm-nets')} nets" in rows
    assert f"dataset gaussian-ring dpdm-data {importlib.metadata.version('dpdm-data')} data" in rows


# --- a tiny real run ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    work = tmp_path_factory.mktemp("cli-run")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(work)
        result = invoke("run", TOY2D, *sets(TINY))
    assert result.exit_code == 0, (result.output, result.exception)
    runs = [p for p in (work / "runs").iterdir() if p.name != "latest"]
    assert len(runs) == 1
    return {"work": work, "run": runs[0], "result": result}


def test_tiny_run_output(tiny_run):
    run, result = tiny_run["run"], tiny_run["result"]
    assert re.fullmatch(r"toy2d-\d{8}-\d{6}", run.name)
    assert f"run directory: runs/{run.name}" in result.stderr
    assert f"done: runs/{run.name}/report.json, report.md, figures/" in result.stderr
    assert "Sampling quality vs NFE" in result.stdout and "Recovery (Section 5.1)" in result.stdout
    lines = result.stdout.splitlines()  # piped: report.md as written, every number in full (not rich's layout)
    assert any(line.startswith("| NFE | student dpdm |") for line in lines) and "…" not in result.stdout


def test_latest_points_at_the_run(tiny_run):
    latest = tiny_run["work"] / "runs" / "latest"
    assert latest.is_symlink()
    assert os.readlink(latest) == tiny_run["run"].name  # relative: the runs/ folder can be moved
    assert latest.resolve() == tiny_run["run"].resolve()


def _finite(v):
    return isinstance(v, float) and math.isfinite(v)


def test_report_json(tiny_run):
    report = json.loads((tiny_run["run"] / "report.json").read_text())
    assert report["metric"] == "energy"
    assert report["recipe"] == "toy2d"
    sweep = report["sweep"]
    assert list(sweep) == ["student", "undistilled", "teacher"]  # undistilled: the teacher with the student's sampler
    assert list(sweep["undistilled"]) == ["dpdm"] and list(sweep["undistilled"]["dpdm"]) == ["1", "2"]
    assert list(sweep["student"]) == ["dpdm"]
    assert list(sweep["student"]["dpdm"]) == ["1", "2"]
    assert list(sweep["teacher"]) == ["euler", "heun", "dpmpp-2m"]
    assert list(sweep["teacher"]["euler"]) == ["1", "2", "3"]
    assert list(sweep["teacher"]["heun"]) == ["1", "3"]  # Heun's NFE is odd: 2 is skipped
    assert list(sweep["teacher"]["dpmpp-2m"]) == ["1", "2", "3"]
    for by_sampler in sweep.values():
        for values in by_sampler.values():
            assert all(_finite(v) and v >= 0 for v in values.values()), values
    # one step: every sampler's NFE-1 result is the denoiser applied once to the same noise at σ_max = 80
    t = sweep["teacher"]
    # (x + (0 - σ)(x - D(x))/σ = D(x) up to float32 rounding)
    assert t["heun"]["1"] == pytest.approx(t["euler"]["1"], rel=1e-5)
    assert t["dpmpp-2m"]["1"] == pytest.approx(t["euler"]["1"], rel=1e-5)
    assert list(report["recovery"]) == ["0.5", "1", "2", "5"]
    for sigma, v in report["recovery"].items():
        assert set(v) == {"noisy", "student", "teacher"}
        assert all(_finite(x) for x in v.values()), (sigma, v)
        assert report["checks"]["recovery_ratio"][sigma] == pytest.approx(v["student"] / v["teacher"], rel=1e-12)
    one = report["one_step"]
    assert list(one["validation"]) == ["80.0", "2.5"]
    assert one["best_sigma_max"] == min((80.0, 2.5), key=lambda s: one["validation"][str(s)])
    assert _finite(one["value"])
    vs = report["checks"]["student_vs_teacher"]
    assert vs["2"]["heun"]["teacher_nfe"] == 3 and vs["2"]["euler"]["teacher_nfe"] == 2
    assert set(report["timings"]) == {"sweep_s", "noise_s", "recovery_s", "teacher_s", "student_s"}
    real = report["noise"]["real"]  # the estimator's noise: two disjoint real sets scored like samples
    assert real["spread"] == pytest.approx(abs(real["a"] - real["b"])) and real["num"] == 300


def test_run_files(tiny_run):
    run = tiny_run["run"]
    # the resolved recipe, readable as a recipe
    assert load_recipe(str(run / "config.yaml")) == load_recipe(TOY2D, TINY)
    md = (run / "report.md").read_text()
    assert md.startswith("# Report: toy2d\n") and "| NFE |" in md
    assert "| 2 | " in md and "so it reaches only odd NFEs" in md  # why Heun has no NFE 2
    roles = {"teacher": {"role": "teacher"}, "student": {"role": "student", "steps": 20}, "fake": {"role": "fake"}}
    for name, extra in roles.items():
        _, spec, got = read_checkpoint(str(run / "checkpoints" / f"{name}.safetensors"))
        assert got == extra
        assert spec["backbone"] == {"name": "mlp", "hidden": 32, "depth": 1, "emb_dim": 128}
        assert spec["shape"] == [2] and spec["label_dim"] == 0
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [
        "fake.safetensors", "student.safetensors", "teacher.safetensors", "train"]  # no temporary files
    # training snapshots of both phases: the last one of each (engine.checkpoint.every 1000 > steps)
    for phase, step in (("teacher", 60), ("student", 20)):
        snaps = sorted(p.name for p in (run / "checkpoints" / "train" / phase).iterdir())
        assert snaps == [f"ckpt-{step:09d}"]
        assert (run / "checkpoints" / "train" / phase / snaps[0] / "COMPLETE").is_file()
    figures = sorted(p.name for p in (run / "figures").glob("*.png"))
    assert {"samples_student.png", "samples_teacher_euler.png", "samples_teacher_heun.png",
            "samples_teacher_dpmpp-2m.png", "nfe_curve.png", "recovery.png"} <= set(figures)
    for name in figures:
        assert (run / "figures" / name).read_bytes()[:8] == PNG, name
    log = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [(r["phase"], r["step"]) for r in log] == [("teacher", 50), ("teacher", 60), ("student", 20)]
    for r in log:
        lr = {"lr"} if r["phase"] == "teacher" else {"student_lr", "fake_lr"}
        assert {"nimg", "images_per_s", "peak_mem_mb", "skipped"} | lr <= set(r), r
        assert all(_finite(r[k]) for k in r if k.endswith("_loss") or k == "loss"), r


def test_run_with_a_given_teacher_and_out(tiny_run, tmp_path, monkeypatch):
    """``--out`` writes there (no runs/latest); a loaded teacher evaluates exactly like the one that was trained."""
    monkeypatch.chdir(tmp_path)
    teacher = tiny_run["run"] / "checkpoints" / "teacher.safetensors"
    ok(invoke("run", TOY2D, *sets(TINY + ["train.steps=2", f"teacher.checkpoint={teacher}"]), "--out", "mine"))
    assert not (tmp_path / "runs").exists()
    a = json.loads((tiny_run["run"] / "report.json").read_text())
    b = json.loads((tmp_path / "mine" / "report.json").read_text())
    assert b["sweep"]["teacher"] == a["sweep"]["teacher"]
    assert {s: v["teacher"] for s, v in b["recovery"].items()} == {s: v["teacher"] for s, v in a["recovery"].items()}
    old = read_checkpoint(str(teacher))
    new = read_checkpoint(str(tmp_path / "mine" / "checkpoints" / "teacher.safetensors"))
    assert old[1:] == new[1:] and old[0].keys() == new[0].keys()
    assert all(torch.equal(old[0][k], new[0][k]) for k in old[0])


def test_run_with_the_ikl_divergence(tiny_run, tmp_path, monkeypatch):
    """Diff-Instruct's IKL is picked by name in a recipe; its student is a one-step generator from pure noise."""
    monkeypatch.chdir(tmp_path)
    teacher = tiny_run["run"] / "checkpoints" / "teacher.safetensors"
    ok(invoke("run", TOY2D, *sets(TINY + ["train.steps=3", f"teacher.checkpoint={teacher}",
                                          "train.divergence={name: ikl, generator_sigma: 40.0}"]), "--out", "ikl"))
    cfg = load_recipe(str(tmp_path / "ikl" / "config.yaml"))
    assert cfg.train.divergence.name == "ikl" and cfg.train.divergence.options == {"generator_sigma": 40.0}
    report = json.loads((tmp_path / "ikl" / "report.json").read_text())
    assert all(math.isfinite(v) for v in report["sweep"]["student"]["dpdm"].values())
    bad = user_error(invoke("run", TOY2D, "--dry-run", "--set", "train.divergence={name: ikl, renoise: same}"))
    assert "recipe.train.divergence.renoise: unknown option for divergence 'ikl'" in squash(bad)


def test_run_with_a_student_of_another_architecture(tiny_run, tmp_path, monkeypatch):
    """``train.student`` trains a student network of its own from scratch; teacher and fake keep ``model``."""
    monkeypatch.chdir(tmp_path)
    teacher = tiny_run["run"] / "checkpoints" / "teacher.safetensors"
    ok(invoke("run", TOY2D, *sets(TINY + ["train.steps=3", f"teacher.checkpoint={teacher}",
                                          "train.student={backbone: {name: mlp, hidden: 16, depth: 2}}"]),
              "--out", "own"))
    ckpt = tmp_path / "own" / "checkpoints"
    assert read_checkpoint(str(ckpt / "student.safetensors"))[1]["backbone"] == {"name": "mlp", "hidden": 16, "depth": 2}
    assert read_checkpoint(str(ckpt / "fake.safetensors"))[1] == read_checkpoint(str(teacher))[1]
    ok(invoke("recover", "--sigma", "1", "--run", tmp_path / "own", "--json"))


def test_run_with_a_stylegan2_student_on_digits(tmp_path, monkeypatch):
    """The paper's point that the student need not be a UNet: a StyleGAN2 student of an MLP teacher on digits."""
    monkeypatch.chdir(tmp_path)
    digits = str(Path(TOY2D).parent / "digits.yaml")
    ok(invoke("run", digits, *sets([
        "teacher.train.steps=5", "train.steps=2", "train.fake_updates=1", "eval.num_samples=50",
        "eval.recovery_num=50", "eval.teacher_nfe=[1]", "eval.student_steps=[1]", "eval.one_step_sigma_max=[80.0]",
        "eval.recovery_sigmas=[1.0]", "model.backbone.hidden=32", "model.backbone.depth=1",
        "train.student={backbone: {name: stylegan2, channels: 8, channel_max: 16, w_dim: 16, mapping_layers: 1}}"]),
        "--out", "sg"))
    spec = read_checkpoint(str(tmp_path / "sg" / "checkpoints" / "student.safetensors"))[1]
    assert spec["backbone"]["name"] == "stylegan2" and spec["shape"] == [1, 8, 8]
    report = json.loads((tmp_path / "sg" / "report.json").read_text())
    assert math.isfinite(report["sweep"]["student"]["dpdm"]["1"])


# --- recover -----------------------------------------------------------------------------------------------------


def test_recover_json_with_run(tiny_run, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no runs/ here: --run is what counts
    run = tiny_run["run"]
    r = ok(invoke("recover", "--sigma", "2.0", "--sigma", "0.5", "--json", "--run", run))
    data = json.loads(r.stdout)
    assert data["run"] == str(run.resolve())
    assert data["metric"] == "energy" and data["num"] == 300
    assert list(data["recovery"]) == ["2", "0.5"]
    for v in data["recovery"].values():
        assert set(v) == {"noisy", "student", "teacher", "ratio"}
        assert all(_finite(x) for x in v.values())
        assert v["ratio"] == v["student"] / v["teacher"]
    assert data["figure"] == str(run.resolve() / "figures" / "recover.png")
    assert Path(data["figure"]).read_bytes()[:8] == PNG


def test_recover_relies_on_latest(tiny_run, monkeypatch):
    monkeypatch.chdir(tiny_run["work"])
    a = json.loads(ok(invoke("recover", "--sigma", "2.0", "--sigma", "0.5", "--json")).stdout)
    b = json.loads(ok(invoke("recover", "--sigma", "2.0", "--sigma", "0.5", "--json", "--run",
                             tiny_run["run"])).stdout)
    assert a["run"] == str(tiny_run["run"].resolve())
    assert a == b  # deterministic, and the same run


def test_recover_reproduces_the_report(tiny_run):
    """Same σ list, seed and held-out data: the command's numbers are the run's report numbers."""
    run = tiny_run["run"]
    r = ok(invoke("recover", "--sigma", "0.5,1,2", "--sigma", "5", "--json", "--run", run))
    got = json.loads(r.stdout)["recovery"]
    report = json.loads((run / "report.json").read_text())["recovery"]
    assert list(got) == list(report) == ["0.5", "1", "2", "5"]
    for s in report:
        for k in ("noisy", "student", "teacher"):
            assert got[s][k] == pytest.approx(report[s][k], rel=1e-6, abs=1e-9), (s, k)


def test_recover_table(tiny_run, tmp_path):
    fig = tmp_path / "rec.png"
    r = ok(invoke("recover", "--sigma", "2.0", "--sigma", "0.5", "--run", tiny_run["run"], "--figure", fig))
    assert "Recovery, paper protocol (energy, 300 training items)" in squash(r.stdout)  # wraps to the table's width
    rows = [squash(line.replace("|", " ")) for line in r.stdout.splitlines()]  # piped: Markdown tables
    assert "σ 2 0.5" in rows  # Table 1's layout: one column per σ, in the order given
    data = json.loads((tiny_run["run"] / "eval" / "recover.json").read_text())
    for name in ("noisy", "teacher", "student"):
        want = f"{name} {data['recovery']['2'][name]:.3g} {data['recovery']['0.5'][name]:.3g}"
        assert want in rows, (want, rows)
    assert any(row.startswith("ratio ") for row in rows)
    assert f"figure {fig}" in squash(r.stdout)
    assert fig.read_bytes()[:8] == PNG


def _direct_recovery(teacher, student, x0, ids, labels, sigma, seed, reference):
    """Section 5.1 computed here: item i's noise from its own generator seeded by (seed, σ's float64 bits, i)."""
    import struct

    from dpdm.core.train.distributed import derive_seed
    from dpdm.core.plugins.registry import get

    bits = struct.unpack("<Q", struct.pack("<d", float(sigma)))[0]
    stream = derive_seed(seed, bits)
    noise = torch.stack([torch.randn(tuple(x0.shape[1:]), generator=torch.Generator().manual_seed(
        derive_seed(stream, int(i)))) for i in ids])
    noisy = x0 + sigma * noise
    s = torch.full((len(x0),), float(sigma))
    energy = get("metric", "energy")()
    with torch.no_grad():
        return {"noisy": energy(noisy, reference),
                "teacher": energy(teacher(noisy, s, class_labels=labels).float(), reference),
                "student": energy(student(noisy, s, class_labels=labels).float(), reference)}


def test_recover_paper_protocol_is_a_direct_computation(tiny_run):
    """--protocol paper: a seeded subset of the *training* split, compared with the training distribution (fresh
    samples for toy data, as the recipe's eval draws them)."""
    from dpdm.core.datasets import to_model
    from dpdm.core.train.distributed import derive_seed
    from dpdm.core.eval.recovery import SUBSET_STREAM
    from dpdm.core.plugins.registry import get
    from dpdm.core.pipeline.run import load_run, make_dataset

    r = ok(invoke("recover", "--protocol", "paper", "--sigma", "1", "2", "--num", "50", "--seed", "3", "--json",
                  "--run", tiny_run["run"]))
    data = json.loads(r.stdout)
    assert data["recovery_protocol"] == "paper" and data["num"] == 50 and data["seed"] == 3
    assert "training split" in data["protocol"] and data["ref"] == "gaussian-ring fresh samples (300)"
    recipe, teacher, student = load_run(tiny_run["run"])
    train = make_dataset(recipe.data, "train")
    ids = sorted(torch.randperm(len(train), generator=torch.Generator().manual_seed(
        derive_seed(3, SUBSET_STREAM)))[:50].tolist())
    x0 = to_model(train.tensors()[0][ids])
    reference = to_model(train.sample(recipe.eval.num_samples, torch.Generator().manual_seed(recipe.seed + 2000)))
    for sigma in (1.0, 2.0):
        want = _direct_recovery(teacher, student, x0, ids, None, sigma, 3, reference)
        for k, v in want.items():
            assert data["recovery"][f"{sigma:g}"][k] == pytest.approx(v, rel=1e-6, abs=1e-9), (sigma, k)
    energy = get("metric", "energy")()
    assert data["floor"] == pytest.approx(energy(x0, reference), rel=1e-6, abs=1e-9)


def test_recover_heldout_protocol_is_unchanged(tiny_run):
    """--protocol heldout: the first test items, against the validation data of the run's evaluation."""
    from dpdm.core.datasets import to_model
    from dpdm.core.eval.references import gather
    from dpdm.core.pipeline.run import load_run, make_dataset, references

    r = ok(invoke("recover", "--protocol", "heldout", "--sigma", "2", "--num", "40", "--json", "--run",
                  tiny_run["run"]))
    data = json.loads(r.stdout)
    assert data["recovery_protocol"] == "heldout" and data["num"] == 40 and "test" in data["protocol"]
    recipe, teacher, student = load_run(tiny_run["run"])
    test = make_dataset(recipe.data, "test")
    _, validation = references(recipe, make_dataset(recipe.data, "train"), test, recipe.eval.num_samples)
    validation = gather(validation)  # the items, read item by item, as one tensor
    want = _direct_recovery(teacher, student, to_model(test.tensors()[0][:40]), range(40), None, 2.0, 0, validation)
    for k, v in want.items():
        assert data["recovery"]["2"][k] == pytest.approx(v, rel=1e-6, abs=1e-9), k
    paper = json.loads(ok(invoke("recover", "--sigma", "2", "--num", "40", "--json", "--run", tiny_run["run"])).stdout)
    assert paper["recovery_protocol"] == "paper" and paper["recovery"]["2"] != data["recovery"]["2"]


def test_recover_sigma_gets_the_same_noise_alone_and_in_a_list(tiny_run):
    alone = json.loads(ok(invoke("recover", "--sigma", "2", "--num", "60", "--json", "--run", tiny_run["run"])).stdout)
    listed = json.loads(ok(invoke("recover", "--sigma", "0.5", "1", "2", "5", "--num", "60", "--json", "--run",
                                  tiny_run["run"])).stdout)
    assert alone["recovery"]["2"] == listed["recovery"]["2"]


def test_recover_num_beyond_the_split_uses_all_of_it(tiny_run):
    from dpdm.core.pipeline.run import load_run, make_dataset

    recipe, _, _ = load_run(tiny_run["run"])
    size = len(make_dataset(recipe.data, "test"))
    r = ok(invoke("recover", "--protocol", "heldout", "--sigma", "5", "--num", size + 5, "--json", "--run",
                  tiny_run["run"]))
    data = json.loads(r.stdout)
    note = f"--num {size + 5} is more than the {size} items of the test split; using all {size} of them"
    assert data["num"] == size and data["note"] == note
    assert squash(r.stderr) == f"note: {note}"


def test_recover_bad_protocol(tiny_run):
    err = user_error(invoke("recover", "--protocol", "train", "--sigma", "1", "--run", tiny_run["run"]))
    assert squash(err) == ("error: --protocol: unknown recovery protocol 'train'; use 'paper' (Section 5.1: noised "
                           "training items against the training set) or 'heldout' (noised test items against "
                           "independent data)")


def test_recipe_recovery_protocol(tiny_run, tmp_path, monkeypatch):
    report = json.loads((tiny_run["run"] / "report.json").read_text())
    assert report["recovery_protocol"] == "paper" and report["recovery_num"] == 300
    md = (tiny_run["run"] / "report.md").read_text()
    assert "## Recovery (Section 5.1), protocol paper" in md and "random subset of the training split" in md
    monkeypatch.chdir(tmp_path)
    err = user_error(invoke("run", TOY2D, "--dry-run", "--set", "eval.recovery_protocol=test"))
    assert "recipe.eval.recovery_protocol" in err and "'test'" in err
    teacher = tiny_run["run"] / "checkpoints" / "teacher.safetensors"
    ok(invoke("run", TOY2D, *sets(TINY + ["train.steps=2", f"teacher.checkpoint={teacher}",
                                          "eval.recovery_protocol=heldout", "eval.recovery_sigmas=[2.0]",
                                          "seed=7"]),
              "--out", "held"))
    report = json.loads((tmp_path / "held" / "report.json").read_text())
    assert report["recovery_protocol"] == "heldout"
    assert "protocol heldout" in (tmp_path / "held" / "report.md").read_text()
    again = json.loads(ok(invoke("recover", "--protocol", "heldout", "--sigma", "2", "--num", "300", "--json",
                                 "--run", tmp_path / "held")).stdout)
    assert again["seed"] == 7  # the recipe's seed by default: the report's numbers again
    for k in ("noisy", "teacher", "student"):
        assert again["recovery"]["2"][k] == pytest.approx(report["recovery"]["2"][k], rel=1e-6, abs=1e-9)


def test_recover_comma_form(tiny_run):
    data = json.loads(ok(invoke("recover", "--sigma", "0.5,1", "--json", "--num", "50", "--run",
                                tiny_run["run"])).stdout)
    assert list(data["recovery"]) == ["0.5", "1"]
    assert data["num"] == 50


def test_recover_without_a_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    err = user_error(invoke("recover", "--sigma", "2"))
    assert squash(err) == ("error: no run given and runs/latest does not exist; run a recipe first "
                           "(`dpdm run recipes/toy2d.yaml`) or pass --run DIR")


@pytest.mark.parametrize("value, message", [
    ("-1", "error: --sigma: noise levels must be positive, got [-1.0]"),
    ("0", "error: --sigma: noise levels must be positive, got [0.0]"),
    ("1,-2", "error: --sigma: noise levels must be positive, got [1.0, -2.0]"),
    ("abc", "error: --sigma: expected a number, got 'abc'"),
    (",", "error: --sigma: noise levels must be positive, got []"),
])
def test_recover_bad_sigma(tiny_run, value, message):
    err = user_error(invoke("recover", "--sigma", value, "--run", tiny_run["run"]))
    assert err == message + "\n"


def test_recover_bad_num_and_metric(tiny_run):
    assert user_error(invoke("recover", "--sigma", "1", "--num", "1", "--run", tiny_run["run"])) == (
        "error: --num must be at least 2, got 1\n")
    err = user_error(invoke("recover", "--sigma", "1", "--metric", "enrgy", "--run", tiny_run["run"]))
    assert err.startswith("error: unknown metric 'enrgy'. Did you mean 'energy'?")


# --- sample --------------------------------------------------------------------------------------------------------


def test_sample_student(tiny_run, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    r = ok(invoke("sample", "--run", tiny_run["run"], "--steps", "2", "--out", "x.png"))
    assert squash(r.stdout) == "wrote x.png (2000 samples, dpdm sampler, dpdm schedule, 2 steps, NFE 2)"
    assert (tmp_path / "x.png").read_bytes()[:8] == PNG


def test_sample_teacher_heun_relies_on_latest(tiny_run, tmp_path, monkeypatch):
    monkeypatch.chdir(tiny_run["work"])
    out = tmp_path / "sub" / "t.png"
    r = ok(invoke("sample", "--model", "teacher", "--sampler", "heun", "--steps", "2", "--num", "100",
                  "--out", out))
    assert squash(r.stdout) == f"wrote {out} (100 samples, heun sampler, karras schedule, 2 steps, NFE 3)"
    assert out.read_bytes()[:8] == PNG


def _sigmas_of_sample(monkeypatch, *args):
    """Run ``dpdm sample ARGS`` and return the sigmas it sampled with (``evaluate.generate`` intercepted)."""
    from dpdm.core.eval import protocols as ev

    seen = []
    real = ev.generate

    def spy(model, sampler, sigmas, *a, **kw):
        seen.append(sigmas)
        return real(model, sampler, sigmas, *a, **kw)

    monkeypatch.setattr(ev, "generate", spy)
    r = ok(invoke("sample", *args))
    assert len(seen) == 1
    return seen[0].tolist(), squash(r.stdout)


@pytest.mark.parametrize("args, sampler, schedule, n", [
    ([], "dpdm", "dpdm", 3),  # the student: its sampler with the recipe's student schedule
    (["--model", "teacher"], "heun", "karras", 3),  # the teacher: Heun with the recipe's teacher schedule
    (["--sampler", "heun"], "heun", "karras", 3),  # Heun without --schedule: Karras, for the student too
    (["--model", "teacher", "--sampler", "dpdm"], "dpdm", "dpdm", 3),
    (["--schedule", "karras"], "dpdm", "karras", 3),  # --schedule reaches the sigmas
    (["--schedule", "dpdm", "--sigma-max", "2.5", "--model", "teacher"], "heun", "dpdm", 3),
])
def test_sample_schedule(tiny_run, tmp_path, monkeypatch, args, sampler, schedule, n):
    from dpdm.core.plugins.registry import get

    sigmas, out = _sigmas_of_sample(monkeypatch, "--run", tiny_run["run"], "--steps", n, "--num", 10,
                                    "--out", tmp_path / "x.png", *args)
    options = {"sigma_max": 2.5} if "--sigma-max" in args else {}
    assert sigmas == get("schedule", schedule)(n, **options).tolist()
    assert f"{sampler} sampler, {schedule} schedule, {n} steps" in out
    assert get("schedule", "dpdm")(n).tolist() != get("schedule", "karras")(n).tolist()  # the cases differ


def test_sample_bad_schedule(tiny_run, tmp_path):
    err = user_error(invoke("sample", "--run", tiny_run["run"], "--schedule", "karas", "--out", tmp_path / "x.png"))
    assert "unknown schedule 'karas'. Did you mean 'karras'?" in squash(err)
    err = user_error(invoke("sample", "--run", tiny_run["run"], "--schedule", "karras", "--sigma-max", "0.001",
                            "--steps", "3", "--out", tmp_path / "x.png"))
    assert squash(err) == ("error: --schedule karras with --steps 3 and --sigma-max 0.001: need 0 < sigma_min <= "
                           "sigma_max, got sigma_min=0.002, sigma_max=0.001")


def test_sample_unknown_sampler(tiny_run, tmp_path):
    out = tmp_path / "x.png"
    err = user_error(invoke("sample", "--run", tiny_run["run"], "--sampler", "nope", "--out", out))
    assert squash(err) == ("error: unknown sampler 'nope'. Registered samplers: dpdm, dpmpp-2m, euler, "
                           "euler-stochastic, heun. Run `dpdm plugins` to see every component and the package that "
                           "provides it.")
    assert not out.exists()


def test_sample_bad_run(tmp_path):
    out = tmp_path / "x.png"
    assert user_error(invoke("sample", "--run", "/nonexistent", "--out", out)) == (
        "error: run directory '/nonexistent' not found\n")
    assert squash(user_error(invoke("sample", "--run", tmp_path, "--out", out))) == (
        f"error: {str(tmp_path)!r} is not a dpdm run directory (no config.yaml in it)")
    assert not out.exists()


def test_sample_bad_model(tiny_run, tmp_path):
    assert user_error(invoke("sample", "--run", tiny_run["run"], "--model", "ema", "--out", tmp_path / "x.png")) == (
        "error: --model must be one of student, teacher, fake, got 'ema'\n")


def test_recover_defaults_to_the_papers_sigmas(tiny_run):
    data = json.loads(ok(invoke("recover", "--json", "--num", "40", "--run", tiny_run["run"])).stdout)
    assert list(data["recovery"]) == ["0.02", "0.05", "0.1", "0.2", "0.5", "0.75", "1", "2", "5", "7.5", "10"]
    assert data["metric"] == "energy" and data["num"] == 40
    assert json.loads((tiny_run["run"] / "eval" / "recover.json").read_text()) == data
    assert Path(data["figure"]).read_bytes()[:8] == PNG


def test_figure_sigmas_spread_over_the_list():
    from dpdm.cli.recover import PAPER_SIGMAS, figure_sigmas

    assert figure_sigmas(PAPER_SIGMAS) == [0.02, 0.2, 2.0, 10.0]  # indices 0, 3, 7, 10 of 11
    assert figure_sigmas([2.0, 0.5]) == [2.0, 0.5]


def test_recover_figure_sigma_must_be_evaluated(tiny_run):
    err = user_error(invoke("recover", "--sigma", "1", "2", "--figure-sigma", "3", "--run", tiny_run["run"]))
    assert squash(err) == "error: --figure-sigma [3.0] are not among --sigma [1.0, 2.0]"


def test_eval_sweep_on_a_run(tiny_run, tmp_path):
    out = tmp_path / "sweep"
    r = ok(invoke("eval", "sweep", "--run", tiny_run["run"], "--student-nfe", "1", "2", "--teacher-nfe", "1", "2", "3",
                  "--teacher-sampler", "heun", "euler", "--num", "200", "--out", out))
    data = json.loads((out / "sweep.json").read_text())
    assert data["metric"] == "energy" and data["num"] == 200
    assert set(data["sweep"]["student"]["dpdm"]) == {"1", "2"}
    assert set(data["sweep"]["teacher"]["heun"]) == {"1", "3"}  # Heun reaches odd NFEs only
    assert set(data["sweep"]["teacher"]["euler"]) == {"1", "2", "3"}
    # the student's numbers are those of its samples: recompute one point directly
    from dpdm.core.eval import protocols as ev
    from dpdm.core.plugins.registry import get
    from dpdm.core.eval.references import gather
    from dpdm.core.pipeline.run import load_run, make_dataset, references

    recipe, teacher, student = load_run(tiny_run["run"])
    reference, _ = references(recipe, make_dataset(recipe.data, "train"), make_dataset(recipe.data, "test"),
                              recipe.eval.num_samples)
    reference = gather(reference)
    x = ev.generate(student, get("sampler", "dpdm"), get("schedule", "dpdm")(2), 200, (2,), seed=0)
    assert data["sweep"]["student"]["dpdm"]["2"] == pytest.approx(get("metric", "energy")()(x, reference), rel=1e-9)
    # the undistilled baseline: the teacher with the student's sampler and schedule
    x = ev.generate(teacher, get("sampler", "dpdm"), get("schedule", "dpdm")(2), 200, (2,), seed=0)
    assert data["sweep"]["undistilled"]["dpdm"]["2"] == pytest.approx(get("metric", "energy")()(x, reference),
                                                                      rel=1e-9)
    c = data["checks"]["student_vs_undistilled"]["2"]
    assert c["student_better"] == (data["sweep"]["student"]["dpdm"]["2"] < data["sweep"]["undistilled"]["dpdm"]["2"])
    best = data["checks"]["student_vs_best_teacher"]["2"]  # the best of euler 1-3, heun 1, 3 (≤ 3 × 2 NFE)
    assert best["teacher"] == min(v for by in data["sweep"]["teacher"].values() for v in by.values())
    assert (out / "nfe_curve.png").read_bytes()[:8] == PNG
    assert sorted(p.name for p in (out / "grids").iterdir())[:2] == ["student-dpdm-nfe01.png", "student-dpdm-nfe02.png"]
    md = (out / "sweep.md").read_text()
    assert "| 2 |" in md and "NFE" in r.stdout and "best teacher at ≤ 3K NFE" in md


def test_eval_sweep_defaults_to_the_table_4_grid(tiny_run, tmp_path):
    out = tmp_path / "grid"
    ok(invoke("eval", "sweep", "--run", tiny_run["run"], "--num", "20", "--out", out, "--device", "cpu"))
    sweep = json.loads((out / "sweep.json").read_text())["sweep"]
    assert list(sweep["student"]["dpdm"]) == [str(n) for n in range(1, 11)]
    table4 = [4, 5, 6, 7, 8, 9, 10, 12, 14, 15, 16, 18, 35]
    assert list(sweep["teacher"]["euler"]) == list(sweep["teacher"]["dpmpp-2m"]) == [str(n) for n in table4]
    assert list(sweep["teacher"]["heun"]) == ["5", "7", "9", "15", "35"]  # Heun's NFE 2·steps − 1 is odd
    md = (out / "sweep.md").read_text()
    assert "Heun's NFE is 2 × steps − 1, so it reaches only odd NFEs" in md
    assert ("| NFE | student dpdm | undistilled teacher dpdm (student's schedule) | teacher heun | teacher euler | "
            "teacher dpmpp-2m |") in md
    table = md.split("| NFE |")[1].split("\n\n")[0]
    rows = {line.split(" | ")[0][2:]: line.split(" | ")[1:] for line in table.splitlines() if line.startswith("| 1")}
    assert rows["12"][0] == rows["12"][1] == rows["12"][2] == "—"  # not the student (1…10), nor Heun (odd) at 12
    assert rows["15"][:2] == ["—", "—"] and rows["15"][2] != "—"
    assert rows["1"][:2] != ["—", "—"] and rows["1"][2:] == ["—", "—", "— |"]  # the teacher starts at 4
    help_text = squash(ok(invoke("eval", "sweep", "--help")).stdout)
    assert "4 5 6 7 8 9 10 12 14 15 16 18 35" in help_text and "Heun reaches only odd NFEs" in help_text


def test_eval_sweep_unknown_sampler(tiny_run):
    err = user_error(invoke("eval", "sweep", "--run", tiny_run["run"], "--teacher-sampler", "hen"))
    assert "unknown sampler 'hen'. Did you mean 'heun'?" in squash(err)


# --- eval cross (Section 5.2, Figure 6) -----------------------------------------------------------------------------


def test_eval_cross_is_direct_generation_and_metric(tiny_run, tmp_path):
    """Each of the 4 cells is the metric of samples generated directly with that model, sampler and schedule; Heun
    cannot take 4 evaluations, so it runs 2 steps (NFE 3) and says so."""
    from dpdm.core.eval import protocols as ev
    from dpdm.core.plugins.registry import get
    from dpdm.core.eval.references import gather
    from dpdm.core.pipeline.run import load_run, make_dataset, references

    out = tmp_path / "cross"
    r = ok(invoke("eval", "cross", "--run", tiny_run["run"], "--nfe", "4", "--num", "150", "--seed", "2",
                  "--out", out, "--device", "cpu"))
    data = json.loads((out / "cross.json").read_text())
    assert data["metric"] == "energy" and data["nfe"] == 4 and data["num"] == 150 and data["seed"] == 2
    assert data["samplers"] == {"dpdm": {"sampler": {"name": "dpdm"}, "schedule": {"name": "dpdm"}},
                                "heun": {"sampler": {"name": "heun"}, "schedule": {"name": "karras"}}}
    assert {m: list(row) for m, row in data["cells"].items()} == {"student": ["dpdm", "heun"],
                                                                 "teacher": ["dpdm", "heun"]}
    recipe, teacher, student = load_run(tiny_run["run"])
    reference, _ = references(recipe, make_dataset(recipe.data, "train"), make_dataset(recipe.data, "test"),
                              recipe.eval.num_samples)
    reference = gather(reference)
    energy = get("metric", "energy")()
    plan = {"dpdm": (get("sampler", "dpdm"), get("schedule", "dpdm")(4), 4),
            "heun": (get("sampler", "heun"), get("schedule", "karras")(2), 3)}
    for model_name, model in (("student", student), ("teacher", teacher)):
        for column, (sampler, sigmas, nfe) in plan.items():
            cell = data["cells"][model_name][column]
            assert cell["nfe"] == nfe and cell["sigmas"] == sigmas.tolist()
            x = ev.generate(model, sampler, sigmas, 150, (2,), seed=2)
            assert cell["value"] == pytest.approx(energy(x, reference), rel=1e-9), (model_name, column)
    rows = [squash(line.replace("|", " ")) for line in r.stdout.splitlines()]  # piped: Markdown tables
    cells = data["cells"]["student"]
    assert f"student {cells['dpdm']['value']:.4g} (NFE 4) {cells['heun']['value']:.4g} (NFE 3)" in rows, rows
    assert "lower is better" in squash(r.stdout) and "heun: heun sampler, karras schedule" in squash(r.stdout)
    assert (out / "cross.png").read_bytes()[:8] == PNG


def test_eval_cross_defaults_to_the_papers_7_nfe_in_the_run(tiny_run):
    ok(invoke("eval", "cross", "--run", tiny_run["run"], "--num", "20", "--device", "cpu"))
    data = json.loads((tiny_run["run"] / "eval" / "cross.json").read_text())
    assert data["nfe"] == 7
    assert {(m, c): (cell["steps"], cell["nfe"]) for m, row in data["cells"].items() for c, cell in row.items()} == {
        ("student", "dpdm"): (7, 7), ("student", "heun"): (4, 7), ("teacher", "dpdm"): (7, 7),
        ("teacher", "heun"): (4, 7)}
    assert (tiny_run["run"] / "eval" / "cross.png").read_bytes()[:8] == PNG


@pytest.mark.parametrize("value", ["0", "-3"])
def test_eval_cross_bad_nfe(tiny_run, value):
    err = user_error(invoke("eval", "cross", "--run", tiny_run["run"], "--nfe", value))
    assert squash(err) == f"error: --nfe: the number of evaluations must be at least 1, got {value}"
