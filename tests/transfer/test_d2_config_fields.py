"""Every field of every Detectron2 task config reaches Detectron2 or is refused by name (keys.py's appliers).

Each leaf field of each task config (full and smoke presets) is changed alone to other valid values; the
change must alter the Detectron2 assignments (only the keys that field sets), or be refused naming the field,
or the field must be declared ignored with a reason this file lists. Where detectron2 imports, the resolved
CfgNode of :func:`transfer.engines.detectron2.config.build_config` must change too (or the build refuse the
value naming the field); without detectron2 that part skips.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Iterator, List, Optional, Tuple

import pytest
import torch

from pretrain.utils.config import load_config
from transfer.engines import detectron2 as d2_engine
from transfer.engines.detectron2 import keys
from transfer.engines.detectron2.keys import RefusedValueError, resolve
from transfer.registry import ENGINES, TASKS, get_task
from transfer.runner import config_path

# every task the Detectron2 engine implements, with the Detectron2 YAML its spec names
TASK_YAML = {t: s.engine_configs["detectron2"] for t, s in TASKS.items() if s.recipe in ENGINES["detectron2"].recipes}
needs_d2 = pytest.mark.skipif(not d2_engine.available(),
                              reason="detectron2 is not installed (no PyPI release; README 'Detectron2 engine')")

# the fields the engine may leave without effect, and why that is right (an Ignored entry not listed here fails)
JUSTIFIED_IGNORED = {
    # the engine reads images through Detectron2's mappers (read_image raises): it never skips one, so the bound
    # on skipped images is never reached; the built-in engine skips and counts them
    "data.max_unreadable_fraction",
}
_NORMS = {"SyncBN": "FrozenBN", "FrozenBN": "SyncBN", "BN": "SyncBN", "": "SyncBN"}
# values worth trying beside the generic change (a valid alternative the generic one would miss)
_ALSO = {"hflip_prob": [0.0, 0.5], "size_divisible": [0, 1, 32]}


def _task_cfg(task: str, preset: str):
    spec = get_task(task)
    return load_config(spec.schema, config_path(spec, preset), [])


def leaves(node: Any, prefix: str = "") -> Iterator[Tuple[str, Any]]:
    for f in dataclasses.fields(node):
        value = getattr(node, f.name)
        if dataclasses.is_dataclass(value):
            yield from leaves(value, f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", value


def replaced(node: Any, path: str, value: Any) -> Any:
    head, _, rest = path.partition(".")
    return dataclasses.replace(node, **{head: replaced(getattr(node, head), rest, value) if rest else value})


def changes(path: str, value: Any) -> List[Any]:
    """Other values of a field: the generic change of its type, and the alternatives in ``_ALSO``."""
    leaf = path.rsplit(".", 1)[-1]
    if isinstance(value, bool):
        out = [not value]
    elif isinstance(value, int):
        out = [value + 1]
    elif isinstance(value, float):
        out = [value + 0.25]
    elif isinstance(value, str):
        out = [_NORMS[value] if leaf.endswith("norm") else value + "_other"]
    elif isinstance(value, list):
        out = [[changes(path, v)[0] for v in value]]
    else:
        raise TypeError(f"{path}: no change defined for a {type(value).__name__}")
    return [v for v in out + _ALSO.get(leaf, []) if v != value]


def field_problems(task: str, preset: str, build: Optional[Callable[[Any], str]] = None) -> List[str]:
    """What is wrong with the way ``task``'s config reaches Detectron2, one line per field and value.

    ``build``: task config -> the resolved Detectron2 config as text (a :class:`RefusedValueError` propagates);
    None checks the assignments only."""
    cfg = _task_cfg(task, preset)
    base = resolve(cfg)
    base_text = build(cfg) if build else None
    problems = [f"{task}/{preset}: {p} is declared without a reason" for p, why in
                {**base.ignored, **base.engine_reads}.items() if len(why.split()) < 3]
    declared = set(base.ignored)
    for path, value in leaves(cfg):
        for new in changes(path, value):
            what = f"{task}/{preset}: {path}={new!r} (was {value!r})"
            try:
                res = resolve(replaced(cfg, path, new))
            except RefusedValueError as e:
                if path not in e.fields or path not in str(e):
                    problems.append(f"{what}: refused for another field: {e}")
                continue
            changed = {k for k in set(res.assignments) | set(base.assignments)
                       if res.assignments.get(k, "<unset>") != base.assignments.get(k, "<unset>")}
            if path in base.ignored:
                if path not in JUSTIFIED_IGNORED:
                    problems.append(f"{what}: declared ignored ({base.ignored[path]}) without a justification here")
                if changed:
                    problems.append(f"{what}: declared ignored yet changes {sorted(changed)}")
            elif not changed:
                problems.append(f"{what}: changes no Detectron2 assignment")
            elif any(base.sources.get(k, res.sources.get(k)) != path for k in changed):
                problems.append(f"{what}: changes keys set by other fields: {sorted(changed)}")
            if build is None:
                continue
            try:
                text = build(replaced(cfg, path, new))
            except RefusedValueError as e:
                if path not in e.fields or path not in str(e):
                    problems.append(f"{what}: the build refused it for another field: {e}")
                continue
            if path in JUSTIFIED_IGNORED:
                if text != base_text:
                    problems.append(f"{what}: listed as ignored, yet the resolved config changes")
            elif text == base_text:
                problems.append(f"{what}: the resolved Detectron2 config does not change")
    stale = (JUSTIFIED_IGNORED & {p for p, _ in leaves(cfg)}) - declared
    problems += [f"{task}/{preset}: {p} is listed as ignored here but the engine maps it" for p in sorted(stale)]
    return problems


@pytest.mark.parametrize("preset", ["full", "smoke"])
@pytest.mark.parametrize("task", sorted(TASK_YAML))
def test_every_field_reaches_detectron2_or_is_refused_by_name(task, preset):
    problems = field_problems(task, preset)
    assert not problems, "\n".join(problems)


def test_the_check_catches_a_silently_dropped_field(monkeypatch, tmp_path):
    """The bug the table replaced: ``input.size_divisible`` fell through every branch and was ignored (and with
    detectron2, the resolved config shows it too)."""
    from transfer.tasks.detection import InputConfig

    table = dict(keys.appliers())
    table[(InputConfig, "size_divisible")] = lambda value: {}
    monkeypatch.setattr(keys, "appliers", lambda: table)
    problems = field_problems("coco_fpn_1x", "full")
    assert problems and all("input.size_divisible" in p for p in problems), problems
    if d2_engine.available():
        problems = field_problems("coco_fpn_1x", "smoke", build=_builder("coco_fpn_1x", tmp_path))
        assert any("input.size_divisible" in p and "resolved Detectron2 config does not change" in p
                   for p in problems), problems
    # and an ignored field the test does not justify
    table[(InputConfig, "size_divisible")] = keys.Ignored("some reason")
    assert any("without a justification" in p for p in field_problems("voc07_det", "smoke"))


def test_refusals_name_the_field():
    cfg = _task_cfg("voc07_det", "full")
    for path, value, reason in [("precision.amp_bf16", True, "fp16"), ("input.hflip_prob", 0.3, "probability 0.5"),
                                ("model.smooth_l1_beta", 0.1, None)]:
        if reason is None:  # a valid value: both heads' keys
            assert {k: v for k, v in resolve(replaced(cfg, path, value)).assignments.items() if "SMOOTH" in k} == \
                {"MODEL.RPN.SMOOTH_L1_BETA": 0.1, "MODEL.ROI_BOX_HEAD.SMOOTH_L1_BETA": 0.1}
            continue
        with pytest.raises(RefusedValueError, match=reason) as e:
            resolve(replaced(cfg, path, value))
        assert e.value.path == path and str(e.value).startswith(f"{path}={value!r}")


def test_subclassed_configs_inherit_their_bases_entries():
    cfg = _task_cfg("voc07_det", "smoke")
    sub = dataclasses.make_dataclass("MySolver", [], bases=(type(cfg.solver),), frozen=True)
    res = resolve(dataclasses.replace(cfg, solver=sub(**dataclasses.asdict(cfg.solver))))
    assert res.assignments == resolve(cfg).assignments


# ---------------------------------------------------------------- with detectron2 installed

def _ctx(tmp_path, task):
    from transfer.context import TrialContext

    return TrialContext(task=task, trial=0, seed=0, engine="detectron2", device=torch.device("cpu"),
                        data_root=tmp_path / "data", output_dir=tmp_path / "out", cache_dir=tmp_path / "cache")


def _builder(task: str, tmp_path) -> Callable[[Any], str]:
    from transfer.engines.detectron2.config import build_config
    from transfer.weights.resolve import BackboneWeights

    weights = BackboneWeights(name="random", arch="resnet50", state_dict=None)
    ctx = _ctx(tmp_path, task)
    return lambda cfg: build_config(TASK_YAML[task], cfg, weights, ctx, ["train"], ["test"]).dump()


@needs_d2
@pytest.mark.parametrize("preset", ["full", "smoke"])
@pytest.mark.parametrize("task", sorted(TASK_YAML))
def test_every_field_changes_the_resolved_detectron2_config(task, preset, tmp_path):
    if "densepose" in TASK_YAML[task] and not d2_engine.densepose_available():
        pytest.skip("Detectron2's DensePose project is not importable (its keys come from add_densepose_config)")
    problems = field_problems(task, preset, build=_builder(task, tmp_path))
    assert not problems, "\n".join(problems)


@needs_d2
@pytest.mark.parametrize("task,yaml_pads", [("voc07_det", 0), ("coco_c4_1x", 0), ("coco_fpn_1x", 32),
                                            ("voc_semseg", 0)])
def test_size_divisibility_is_the_built_backbones(task, yaml_pads, tmp_path):
    """The engine's reading of the YAML is what Detectron2 builds (``Backbone.size_divisibility``)."""
    from detectron2.modeling import build_backbone

    from transfer.engines.detectron2.config import backbone_size_divisibility, build_config
    from transfer.weights.resolve import BackboneWeights

    cfg = build_config(TASK_YAML[task], _task_cfg(task, "smoke"), BackboneWeights("random", "resnet50", None),
                       _ctx(tmp_path, task), ["a"], ["b"])
    assert backbone_size_divisibility(cfg) == build_backbone(cfg).size_divisibility == yaml_pads


@needs_d2
def test_a_size_divisible_detectron2_cannot_honour_is_refused(tmp_path):
    c4, fpn = _task_cfg("voc07_det", "smoke"), _task_cfg("coco_fpn_1x", "smoke")
    build_c4, build_fpn = _builder("voc07_det", tmp_path), _builder("coco_fpn_1x", tmp_path)
    for value in (0, 1):
        build_c4(replaced(c4, "input.size_divisible", value))  # no padding, as C4's size_divisibility 0
    build_fpn(replaced(fpn, "input.size_divisible", 32))
    for build, cfg, value, pads in [(build_c4, c4, 32, 0), (build_fpn, fpn, 16, 32), (build_fpn, fpn, 1, 32)]:
        with pytest.raises(RefusedValueError, match=f"input.size_divisible={value} .*size_divisibility, {pads}"):
            build(replaced(cfg, "input.size_divisible", value))
