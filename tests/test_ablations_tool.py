"""benchmarks/ablations.py keeps each (variant, seed) result in --work so that a long study can stop and go on:
a kept result must be reused only when it was made from the same recipe and overrides."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ablations():
    spec = importlib.util.spec_from_file_location("ablations_tool", ROOT / "benchmarks" / "ablations.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_kept_result_is_reused_only_for_its_own_key(ablations, tmp_path):
    calls = []

    def make(value):
        def f():
            calls.append(value)
            return {"value": value}
        return f

    path = tmp_path / "results" / "v-s0.json"
    assert ablations.kept_or_run(path, "k1", make(1)) == {"value": 1}
    assert ablations.kept_or_run(path, "k1", make(2)) == {"value": 1}  # kept: not run again
    assert calls == [1]
    assert ablations.kept_or_run(path, "k2", make(3)) == {"value": 3}  # another recipe/overrides: run again
    assert calls == [1, 3]
    assert json.loads(path.read_text()) == {"key": "k2", "result": {"value": 3}}
    assert sorted(p.name for p in path.parent.iterdir()) == ["v-s0.json"]  # written atomically, nothing left over
    assert ablations.kept_or_run(tmp_path / "absent.json", "k", None) is None  # --kept: nothing is run


def test_the_key_covers_the_recipe_text_and_every_override(ablations, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: a\n")
    key = ablations.run_key(str(recipe), ["seed=0"])
    assert ablations.run_key(str(recipe), ["seed=0"]) == key
    assert ablations.run_key(str(recipe), ["seed=1"]) != key
    assert ablations.run_key(str(recipe), ["seed=0", "train.fake_lora={rank: 4}"]) != key
    recipe.write_text("name: b\n")
    assert ablations.run_key(str(recipe), ["seed=0"]) != key


@pytest.mark.parametrize("only, chosen", [
    (["fake_lora rank 16"], ["fake_lora rank 16"]),  # a whole name: that variant alone
    (["rank 16"], ["fake_lora rank 16", "fake_lora rank 16, fake_lr x10"]),  # text: every variant containing it
    (["full fake (recipe)", "rank 4"], ["full fake (recipe)", "fake_lora rank 4"]),
])
def test_only_selects_by_whole_name_or_by_text(ablations, monkeypatch, tmp_path, only, chosen):
    seen = []

    def fake_run(recipe, out, resume=False):
        seen.append(out.name)
        return {"metric": "energy", "sweep": {"student": {"dpdm": {"1": 0.5}}}, "one_step": {"validation": {}},
                "checks": {"recovery_ratio": {"1.0": 0.9}}}

    monkeypatch.setattr(ablations, "run", fake_run)
    argv = ["ablations.py", "--recipe", str(ROOT / "recipes" / "toy2d.yaml"), "--group", "lora", "--seeds", "0",
            "--work", str(tmp_path / "w"), "--out", str(tmp_path / "out.json")]
    for o in only:
        argv += ["--only", o]
    monkeypatch.setattr(sys, "argv", argv)
    ablations.main()
    assert list(json.loads((tmp_path / "out.json").read_text())["variants"]) == chosen
    assert seen[0] == "teacher" and len(seen) == 1 + len(chosen)
    # run again: everything is kept, nothing runs; --kept tabulates the same
    seen.clear()
    ablations.main()
    monkeypatch.setattr(sys, "argv", argv + ["--kept"])
    ablations.main()
    assert seen == []
    assert list(json.loads((tmp_path / "out.json").read_text())["variants"]) == chosen


def test_kept_without_a_teacher_says_what_to_do(ablations, monkeypatch, tmp_path):
    monkeypatch.setattr(sys, "argv", ["ablations.py", "--recipe", str(ROOT / "recipes" / "toy2d.yaml"), "--kept",
                                      "--work", str(tmp_path)])
    with pytest.raises(SystemExit, match="holds no teacher.*without --kept"):
        ablations.main()


@pytest.mark.parametrize("recipe, fake_lr", [("toy2d", "0.001"), ("mnist16", "0.0005")])
def test_ten_times_the_fake_lr_is_ten_times_each_recipes_own(ablations, monkeypatch, tmp_path, recipe, fake_lr):
    loaded = []

    def fake_run(recipe, out, resume=False):
        loaded.append((out.name, recipe.train.fake_lr))
        return {"metric": "energy", "sweep": {"student": {"dpdm": {"1": 0.5}}}, "one_step": {"validation": {}},
                "checks": {"recovery_ratio": {"1.0": 0.9}}}

    monkeypatch.setattr(ablations, "run", fake_run)
    monkeypatch.setattr(sys, "argv", ["ablations.py", "--recipe", str(ROOT / "recipes" / f"{recipe}.yaml"),
                                      "--group", "lora", "--only", "full fake, fake_lr x10", "--seeds", "0",
                                      "--work", str(tmp_path), "--out", str(tmp_path / "out.json")])
    ablations.main()
    base = loaded[0][1]  # the teacher's run: the recipe's own
    assert loaded[1][1] == pytest.approx(10 * base) and loaded[1][1] == float(fake_lr)
    variant = json.loads((tmp_path / "out.json").read_text())["variants"]["full fake, fake_lr x10"]
    assert variant["overrides"] == [f"train.fake_lr={fake_lr}"]


def test_adopt_keeps_an_earlier_studys_results_only_for_the_same_teacher(ablations, monkeypatch, tmp_path):
    from safetensors.torch import save_file
    import torch

    teacher_weight = {"w": torch.arange(6.0)}
    seen = []

    def fake_run(recipe, out, resume=False):
        seen.append(out.name)
        if out.name == "teacher":
            (out / "checkpoints").mkdir(parents=True)
            save_file(teacher_weight, str(out / "checkpoints" / "teacher.safetensors"))
        return {"metric": "energy", "sweep": {"student": {"dpdm": {"1": 0.5 + recipe.seed}}},
                "one_step": {"validation": {}}, "checks": {"recovery_ratio": {"1.0": 0.9}}}

    monkeypatch.setattr(ablations, "run", fake_run)

    def study(work, *extra):
        monkeypatch.setattr(sys, "argv", ["ablations.py", "--recipe", str(ROOT / "recipes" / "toy2d.yaml"), "--group",
                                          "lora", "--only", "fake_lora rank 4", "--seeds", "0", "1", "--work",
                                          str(tmp_path / work), "--out", str(tmp_path / f"{work}.json"), *extra])
        ablations.main()
        return json.loads((tmp_path / f"{work}.json").read_text())

    first = study("a")
    assert first["teacher_sha256"] == ablations.weights_sha256(tmp_path / "a" / "teacher" / "checkpoints" /
                                                              "teacher.safetensors")
    seen.clear()
    again = study("b", "--adopt", str(tmp_path / "a.json"))  # another folder, the teacher trained to the same bits
    assert seen == ["teacher"]  # the students were not run again
    assert again["variants"] == first["variants"] and again["teacher_sha256"] == first["teacher_sha256"]
    teacher_weight["w"] = torch.arange(6.0) + 1e-6  # another teacher: nothing is adopted
    with pytest.raises(SystemExit, match="its teacher .* is not this study's"):
        study("c", "--adopt", str(tmp_path / "a.json"))
    assert not (tmp_path / "c" / "results").exists()
