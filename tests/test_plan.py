"""`moeport plan`: its arithmetic against real exports, a runtime session's cache, the checkpoint's own tensor
shapes and the released models' published sizes; the CLI; and the export's refusal and warning."""

from __future__ import annotations

import importlib
import json
import re

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from moeport.exporter.export import export
from moeport.exporter.manifest import read_artifact
from moeport.exporter.sizes import stored_tensors, weights_file_bytes
from moeport.models.checkpoint import Checkpoint
from moeport.models.config import load_config, parse_config
from moeport.runtime.model import load
from moeport.tools import plan as planning
from moeport.tools.bandwidth import active_bytes, active_bytes_per_token
from moeport.tools.checkpoints import PRESETS, make_checkpoint
from moeport.tools.cli import main
from moeport.tools.plan import Machine, parameters, plan

export_module = importlib.import_module("moeport.exporter.export")  # the package exports the function by that name
WEIGHTS = ("fp32", "fp16", "bf16", "int8", "int4")
GB = 10**9
BIG = Machine(mem_total=64 * GB, mem_available=60 * GB, disk_free=500 * GB, disk_path="/big")

# small models of each shape family: tiny (V3, q_lora; int8's block 128 divides no in-dimension, so every
# Linear falls back to bf16), bench's V3 shape at small widths (q_b's in-dim 96 is quantized at int4's block
# 32 but not int8's 128), V2-Lite's shape (no q_lora, softmax routing), and tied embeddings
SHAPES = {
    "tiny": ("tiny", {}),
    "bench-small": (
        "bench",
        dict(
            hidden_size=256,
            intermediate_size=512,
            moe_intermediate_size=128,
            vocab_size=1000,
            num_hidden_layers=2,
            n_routed_experts=8,
            n_group=1,
            topk_group=1,
            q_lora_rank=96,
            kv_lora_rank=64,
            qk_nope_head_dim=32,
            qk_rope_head_dim=16,
            v_head_dim=32,
            num_attention_heads=4,
            num_key_value_heads=4,
        ),
    ),
    "v2-small": (
        "v2-lite",
        dict(
            hidden_size=256,
            intermediate_size=512,
            moe_intermediate_size=128,
            vocab_size=512,
            num_hidden_layers=2,
            n_routed_experts=8,
            kv_lora_rank=64,
            qk_nope_head_dim=32,
            qk_rope_head_dim=16,
            v_head_dim=32,
            num_attention_heads=4,
            num_key_value_heads=4,
            max_position_embeddings=2048,
            bos_token_id=0,
            eos_token_id=1,
        ),
    ),
    "tied": ("tiny", dict(tie_word_embeddings=True)),
}


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """{(shape, weights): (checkpoint, artifact)}: every shape exported at every weights choice."""
    root = tmp_path_factory.mktemp("plan")
    out = {}
    for name, (preset, overrides) in SHAPES.items():
        ckpt = make_checkpoint(root / name, preset, seed=3, overrides=overrides, dtype="fp32")
        for w in WEIGHTS:
            out[name, w] = ckpt, export(ckpt, root / f"{name}-{w}", weights=w)
    return out


def _external(artifact) -> list[tuple[str, tuple[int, ...], int, int]]:
    """(name, shape, onnx dtype, stored length) of every weight in the artifact's external-data file, in file order."""
    model = onnx.load(artifact / "model.onnx", load_external_data=False)
    rows = []
    for t in model.graph.initializer:
        if t.data_location == onnx.TensorProto.EXTERNAL:
            info = {e.key: e.value for e in t.external_data}
            rows.append((t.name, tuple(t.dims), t.data_type, int(info["offset"]), int(info["length"])))
    rows.sort(key=lambda r: r[3])
    return [(n, s, d, length) for n, s, d, _, length in rows]


_ONNX = {"fp32": 1, "uint8": 2, "fp16": 10, "bf16": 16}


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("weights", WEIGHTS)
def test_planned_tensors_are_what_the_exporter_writes(exports, shape, weights):
    ckpt, art = exports[shape, weights]
    cfg = load_config(ckpt)
    planned = stored_tensors(cfg, weights)
    written = _external(art)
    assert [(t.name, t.shape, _ONNX[t.dtype], t.nbytes) for t in planned] == written
    manifest = json.loads((art / "manifest.json").read_text())
    assert sum(t.nbytes for t in planned) == manifest["weights"]["bytes"]
    assert weights_file_bytes(planned) == (art / "model.onnx.data").stat().st_size  # padding included, exactly

    p = plan(cfg, weights, machine=BIG, bandwidth=10 * GB, kernels=True)
    on_disk = sum(f.stat().st_size for f in art.iterdir() if f.name != "manifest.json")
    graph = (art / "model.onnx").stat().st_size
    assert p["artifact_files"]["model.onnx.data"] == (art / "model.onnx.data").stat().st_size
    assert graph <= p["artifact_files"]["model.onnx"] <= graph + (256 << 10)  # an upper estimate, not a wild one
    assert on_disk <= p["artifact_bytes"] + sum(f.stat().st_size for f in art.iterdir() if f.suffix == ".json")


def test_plan_of_an_artifact_uses_its_real_file_sizes(exports):
    _, art = exports["bench-small", "int4"]
    [p] = planning.plan_source(art, machine=BIG, bandwidth=10 * GB, kernels=True)
    manifest = json.loads((art / "manifest.json").read_text())
    assert p["weights"] == "int4" and p["block_size"] == manifest["weights"]["block_size"]
    assert p["artifact_bytes"] == sum(f["size"] for f in manifest["files"].values())
    assert p["artifact_files_measured"] and p["fits_disk"] is None


def test_cache_bytes_are_what_a_session_holds(exports):
    _, art = exports["bench-small", "bf16"]
    model = load(art, backend="cpu")
    manifest = model.artifact.manifest
    for n in (1, 37, 200):
        s = model.session()
        s.prefill(list(range(2, 2 + n)))
        p = plan(model.artifact.config, "bf16", context=n, batch=3, machine=BIG, bandwidth=GB)
        assert p["cache_bytes_per_token"] == manifest["cache"]["bytes_per_token"]
        assert p["cache_bytes"] == 3 * s.cache.nbytes
        assert s.cache.nbytes == sum(v.nbytes for v in s.cache.views())  # rows actually held, every layer


def _active_from_artifact(art, k: int, n_experts: int, vocab: int) -> int:
    """Bytes one token reads as stored, from the artifact's own initializers: every weight whole, except the
    routed expert stacks (k of n_experts) and the (untied) embedding table (one row)."""
    stored = _external(art)
    tied = not any(name.startswith("lm_head.") for name, *_ in stored)
    total = 0.0
    for name, _, _, length in stored:
        if ".experts." in name:
            total += length * k / n_experts
        elif name == "model.embed_tokens.weight" and not tied:
            total += length / vocab
        else:
            total += length
    return round(total)


@pytest.mark.parametrize("shape", ["bench-small", "v2-small", "tied"])
@pytest.mark.parametrize("weights", WEIGHTS)
def test_active_bytes_count_what_the_artifact_stores(exports, shape, weights):
    ckpt, art = exports[shape, weights]
    cfg = load_config(ckpt)
    expected = _active_from_artifact(art, cfg.num_experts_per_tok, cfg.n_routed_experts, cfg.vocab_size)
    assert round(active_bytes(cfg, weights, as_run_on_cpu=False)) == expected
    # as the cpu backend reads them: half weights in place with its kernels, widened to float32 without
    artifact = read_artifact(art, verify=False)
    widened = active_bytes_per_token(artifact, half_kernels=False)
    in_place = active_bytes_per_token(artifact, half_kernels=True)
    if weights in ("fp16", "bf16"):
        assert in_place < widened <= 2 * expected
    if weights == "fp32":
        assert in_place == widened == expected


def test_parameters_count_the_checkpoints_tensors(exports):
    ckpt, _ = exports["bench-small", "fp32"]
    cfg = load_config(ckpt)
    c = Checkpoint(ckpt)
    shapes = {n: c.shape(n) for n in c.names()}
    total = sum(int(np.prod(s)) for s in shapes.values())
    routed = sum(int(np.prod(s)) for n, s in shapes.items() if re.search(r"\.experts\.\d+\.", n))
    idle = routed * (cfg.n_routed_experts - cfg.num_experts_per_tok) // cfg.n_routed_experts
    embed = int(np.prod(shapes["model.embed_tokens.weight"]))
    assert parameters(cfg) == (total, total - idle - embed)


def test_parameters_of_the_released_shapes_match_their_published_sizes():
    total, active = parameters(parse_config(dict(PRESETS["moonlight"])))
    assert (round(total / 1e9, 2), round(active / 1e9, 2)) == (15.96, 2.58)  # Moonlight-16B-A3B
    total, active = parameters(parse_config(dict(PRESETS["v2-lite"])))
    assert round(total / 1e9, 1) == 15.7 and abs(active - 2.4e9) < 0.1e9  # DeepSeek-V2-Lite: 15.7B, 2.4B active


def test_moonlight_int4_plan_matches_the_measured_export():
    """Issue I measured the full-depth Moonlight int4 artifact at 10.7 GB."""
    p = plan(parse_config(dict(PRESETS["moonlight"])), "int4", machine=BIG, bandwidth=38.6 * GB, kernels=True)
    assert round(p["artifact_bytes"] / 1e9, 1) == 10.7
    assert p["decode_tokens_per_second_bound"] == pytest.approx(38.6 * GB / p["active_bytes_per_token"], rel=1e-3)


# -- whether it fits ----------------------------------------------------------------------------------


def _moonlight(weights: str, machine: Machine, **kw):
    return plan(parse_config(dict(PRESETS["moonlight"])), weights, machine=machine, bandwidth=38.6 * GB, **kw)


def test_a_model_larger_than_memory_runs_memory_mapped_when_its_copies_fit():
    box = Machine(mem_total=24 * GB, mem_available=22 * GB, disk_free=100 * GB, disk_path="/d")
    p = _moonlight("bf16", box, kernels=True)  # 32 GB of bf16 weights read in place by moeport's kernels
    assert p["resident"]["total"] > box.mem_available >= p["resident"]["anonymous"]
    assert p["fits"] == "mapped" and "memory-mapped" in p["verdict"] and "disk" in p["verdict"]
    p = _moonlight("bf16", box, kernels=False)  # without them every weight is widened to a float32 copy
    assert p["fits"] == "no" and "does not fit" in p["verdict"]
    assert _moonlight("int4", box, kernels=True)["fits"] == "ram"


def test_a_full_disk_is_named():
    tiny_disk = Machine(mem_total=64 * GB, mem_available=60 * GB, disk_free=5 * GB, disk_path="/small")
    p = _moonlight("int4", tiny_disk, kernels=True)
    assert p["fits_disk"] is False and "/small" in p["verdict"]


def test_the_resident_total_adds_up():
    p = _moonlight("int4", BIG, kernels=True, context=8192, batch=2, prompt=100)
    r = p["resident"]
    assert r["cache"] == 27 * 576 * 4 * 8192 * 2 == p["cache_bytes"]
    assert r["total"] == r["weights_mapped"] + r["weights_copied"] + r["cache"] + r["activations"] + r["overhead"]


@pytest.mark.parametrize(
    "kw, message",
    [
        (dict(weights="int3"), "weights 'int3'"),
        (dict(backend="quantum"), "no memory model for backend 'quantum'"),
        (dict(context=0), "context 0"),
        (dict(context=10**9), "context 1000000000"),
        (dict(batch=0), "batch 0"),
        (dict(prompt=200, context=100), "prompt 200"),
        (dict(bandwidth=-1.0), "bandwidth -1.0"),
        (dict(weights="bf16", block_size=32), "block size only applies"),
        (dict(block_size=24), "block size 24"),
    ],
)
def test_bad_plans_are_refused_by_name(kw, message):
    args = {"weights": "int4", **kw}
    with pytest.raises(planning.PlanError, match=re.escape(message)):
        plan(parse_config(dict(PRESETS["tiny"])), machine=BIG, **args)


# -- the command line ----------------------------------------------------------------------------------


def test_cli_plans_every_weights_choice_of_a_checkpoint(exports, tmp_path):
    ckpt, _ = exports["bench-small", "fp32"]
    r = CliRunner().invoke(main, ["plan", str(ckpt), "--bandwidth", "20", "--output", str(tmp_path), "--json"])
    assert r.exit_code == 0, r.output
    plans = json.loads(r.output)
    assert [p["weights"] for p in plans] == list(WEIGHTS)
    for p in plans:
        _, art = exports["bench-small", p["weights"]]
        assert p["artifact_files"]["model.onnx.data"] == (art / "model.onnx.data").stat().st_size
        assert p["bandwidth_bytes_per_second"] == 20 * GB and not p["bandwidth_measured"]
        assert p["machine"]["disk_path"] == str(tmp_path) and p["fits_disk"] is True
    r = CliRunner().invoke(main, ["plan", str(ckpt), "--bandwidth", "20", "--context", "100", "--batch", "2"])
    assert r.exit_code == 0, r.output
    for w in WEIGHTS:
        assert re.search(rf"^{w} .* tok/s +yes$", r.output, re.M), r.output
    assert "x context 100 x batch 2" in r.output


def test_cli_plans_an_artifact_with_its_own_weights_and_measures_bandwidth(exports):
    _, art = exports["tiny", "int8"]
    r = CliRunner().invoke(main, ["plan", str(art), "--context", "64", "--json"])
    assert r.exit_code == 0, r.output
    [p] = json.loads(r.output)
    assert p["weights"] == "int8" and p["bandwidth_measured"] and p["bandwidth_bytes_per_second"] > 0
    assert p["decode_tokens_per_second_bound"] > 0


def test_cli_plans_a_zoo_model():
    r = CliRunner().invoke(main, ["plan", "zoo:tiny-reasoner", "--weights", "int4", "--bandwidth", "10"])
    assert r.exit_code == 0, r.output
    assert "int4" in r.output and "fits in memory" in r.output


@pytest.mark.parametrize(
    "args, message",
    [
        (["/nonexistent/model"], "no such directory"),
        (["zoo:no-such-model"], "unknown zoo model"),
        (["{empty}"], "neither a checkpoint (no config.json) nor a moeport artifact"),
        (["{bad_config}"], "not valid JSON"),
        (["{art}", "--weights", "fp16"], "is an artifact of int8 weights"),
        (["{art}", "--context", "100000"], "longer than the artifact's max sequence length"),
        (["{ckpt}", "--backend", "quantum"], "no memory model for backend 'quantum'"),
        (["{ckpt}", "--context", "100000"], "context 100000 must be"),
    ],
)
def test_cli_errors_are_one_line(exports, tmp_path, args, message):
    (tmp_path / "empty").mkdir()
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text("{not json")
    places = {
        "empty": tmp_path / "empty",
        "bad_config": tmp_path / "bad",
        "art": exports["tiny", "int8"][1],
        "ckpt": exports["tiny", "fp32"][0],
    }
    args = [a.format(**places) for a in args]
    r = CliRunner().invoke(main, ["plan", *args, "--bandwidth", "10"])
    assert r.exit_code == 1, r.output
    assert message in r.output and r.output.count("\n") == 1 and "Traceback" not in r.output


@pytest.mark.parametrize("args", [["--context", "0"], ["--batch", "x"], ["--bandwidth", "-3"], ["--weights", "q2"]])
def test_cli_bad_numbers_are_usage_errors(exports, args):
    r = CliRunner().invoke(main, ["plan", str(exports["tiny", "fp32"][0]), *args])
    assert r.exit_code == 2 and "Traceback" not in r.output


# -- export: refused when the disk is too small, warned when memory is --------------------------------


def test_export_refuses_a_disk_too_small_before_writing_anything(exports, tmp_path, monkeypatch):
    ckpt, art = exports["bench-small", "int4"]
    monkeypatch.setattr(export_module, "free_bytes", lambda path: 1000)
    out = tmp_path / "out"
    r = CliRunner().invoke(main, ["export", str(ckpt), str(out), "--weights", "int4", "--quiet"])
    assert r.exit_code == 1
    assert "needs" in r.output and "1000" not in r.output and "0.00 GB free" in r.output
    assert "--ignore-space" in r.output and not out.exists() and not list(tmp_path.iterdir())
    r = CliRunner().invoke(main, ["export", str(ckpt), str(out), "--weights", "int4", "--quiet", "--ignore-space"])
    assert r.exit_code == 0, r.output
    assert (out / "model.onnx.data").read_bytes() == (art / "model.onnx.data").read_bytes()


def test_export_checks_against_the_planned_size(exports, tmp_path, monkeypatch):
    """Exactly the planned bytes free is enough; one byte fewer is refused."""
    ckpt, _ = exports["tiny", "int4"]
    need = export_module.artifact_bytes(load_config(ckpt), "int4", 32, ckpt)
    monkeypatch.setattr(export_module, "free_bytes", lambda path: need - 1)
    with pytest.raises(export_module.ExportError, match="needs"):
        export(ckpt, tmp_path / "a", weights="int4")
    monkeypatch.setattr(export_module, "free_bytes", lambda path: need)
    export(ckpt, tmp_path / "a", weights="int4")


@pytest.mark.parametrize("case, expected", [("ram", None), ("mapped", "memory-mapped"), ("no", "will not run")])
def test_export_warns_when_the_artifact_will_not_fit_in_memory(exports, tmp_path, monkeypatch, case, expected):
    ckpt, _ = exports["bench-small", "fp32"]
    monkeypatch.setattr(planning, "cpu_kernels", lambda: True)
    # what export plans for: the whole default context cached, a 512-token prompt
    p = plan(load_config(ckpt), "bf16", context=4096, prompt=512, machine=BIG, measure_bandwidth=False)
    r = p["resident"]
    available = {"ram": r["total"], "mapped": (r["anonymous"] + r["total"]) // 2, "no": r["anonymous"] - 1}[case]
    monkeypatch.setattr(planning, "machine_facts", lambda disk_path=None: Machine(available, available))
    r = CliRunner().invoke(main, ["export", str(ckpt), str(tmp_path / "o"), "--weights", "bf16", "--quiet"])
    assert r.exit_code == 0, r.output
    warnings = [line for line in r.stderr.splitlines() if line.startswith("warning:")]
    if expected is None:
        assert warnings == []
    else:
        assert len(warnings) == 1 and expected in warnings[0]


# -- bench: page faults ---------------------------------------------------------------------------------


def test_bench_reports_decode_page_faults(tiny_artifact):
    r = CliRunner().invoke(
        main, ["bench", str(tiny_artifact), "--prompt-len", "4", "--new-tokens", "8", "--threads", "1", "--json"]
    )
    assert r.exit_code == 0, r.output
    b = json.loads(r.output)
    for kind in ("major", "minor"):
        count = b[f"decode_{kind}_faults"]
        assert isinstance(count, int) and count >= 0
        assert b[f"decode_{kind}_faults_per_token"] == round(count / 8, 2)
        assert b[f"decode_{kind}_faults_per_second"] >= 0
    r = CliRunner().invoke(main, ["bench", str(tiny_artifact), "--prompt-len", "4", "--new-tokens", "8"])
    assert r.exit_code == 0 and "major/token" in r.output and "minor/token" in r.output
