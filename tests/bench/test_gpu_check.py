"""``bench/gpu_check.py --dry``: the one-call GPU check runs on CPU at tiny sizes, so it cannot rot between the
rare lent GPU machines; a failing section is recorded and the others still run."""
from __future__ import annotations

import json

from scripts import load_script  # tests/scripts.py


def test_dry_run_writes_every_section_and_survives_a_failing_one(tmp_path, monkeypatch):
    gc = load_script("bench/gpu_check.py")

    def broken(a, device):
        raise RuntimeError("simulated CUDA error in this section")

    monkeypatch.setitem(gc.RUNNERS, "features", broken)
    # ddp starts two torchrun processes (about 17 s on CPU): its torchrun path is tested by
    # tests/pretrain/test_pretrain_run.py; here every other section runs
    assert gc.main(["--dry", "--skip", "ddp", "--out", str(tmp_path), "--threads", "1"]) == 1  # one section failed
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    sections = report["sections"]
    assert list(sections) == [s for s in gc.SECTIONS if s != "ddp"]
    assert sections["features"]["status"] == "failed"
    assert "RuntimeError: simulated CUDA error in this section" in sections["features"]["error"]
    assert all(sections[s]["status"] == "ok" for s in sections if s != "features")
    moco = {r["variant"]: r for r in sections["moco_step"]["rows"]}
    assert set(moco) == {"fp32_nchw_official", "bf16_cl_split8", "bf16_cl_split1"}  # no compile on CPU
    # FLOPs are counted from the model, not assumed: the same network gives the same count in every variant
    assert len({r["gflop_per_img"] for r in moco.values()}) == 1 and all(r["img_per_s"] > 0 for r in moco.values())
    models = {r["model"] for r in sections["transfer"]["rows"]}
    assert models == {"voc_c4", "coco_c4", "coco_fpn", "coco_keypoints", "fcn16s"}
    ours = sections["coco_eval"]["rows"][0]
    assert ours["detections"] > 0 and 0 < ours["APbb"] < 100
    md = (tmp_path / "gpu_check.md").read_text()
    assert "## features: failed" in md and "| fp32_nchw_official |" in md
