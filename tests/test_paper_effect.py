"""The embedded recipes end to end, checking the paper's effect on the numbers they produce
(slow: minutes each; CI runs them with ``pytest -m slow``).

Claims (issue #2): at 2 and 4 steps (schedule from σ_max = 80) the DPDM student beats every
teacher sampler at the same NFE (Heun, whose NFE is odd, is compared at the next NFE up, so it
never gets fewer evaluations), and at σ ∈ {0.5, 1, 2, 5} the student's recovery distance is at
most 0.8× the teacher's.
"""

import json
from pathlib import Path

import pytest

from dpdm.core.config.recipe import load_recipe
from dpdm.core.pipeline.run import run

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


@pytest.mark.slow
@pytest.mark.parametrize("name", ["toy2d", "digits"])
def test_recipe_shows_the_paper_effect(name, tmp_path):
    report = run(load_recipe(str(RECIPES / f"{name}.yaml")), tmp_path)
    assert json.loads((tmp_path / "report.json").read_text())["sweep"] == report["sweep"]
    vs = report["checks"]["student_vs_teacher"]
    for nfe in ("2", "4"):
        for sampler in ("euler", "heun", "dpmpp-2m"):
            c = vs[nfe][sampler]
            assert c["teacher_nfe"] >= int(nfe)
            assert c["student_better"], f"{name}: student at NFE {nfe} ({c['student']:.4g}) vs {sampler} " \
                                        f"at NFE {c['teacher_nfe']} ({c['teacher']:.4g})"
    for sigma in ("0.5", "1", "2", "5"):
        ratio = report["checks"]["recovery_ratio"][sigma]
        assert ratio is not None and ratio <= 0.8, f"{name}: recovery ratio at σ={sigma} is {ratio:.3f}"
    assert "1" in report["sweep"]["student"]["dpdm"]
    assert report["one_step"]["best_sigma_max"] in load_recipe(str(RECIPES / f"{name}.yaml")).eval.one_step_sigma_max
