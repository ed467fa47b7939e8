"""The benchmarks' and tools' own checks that need no GPU: inductor's byte count, the prepared GPU check's dry
run, the mutation check's mutants."""
import os
import subprocess
import sys

from benchmarks.step_bytes import build, bytes_per_image, fp32_stream
from conftest import ROOT

TINY = dict(image_size=4, patch_size=2, encoder_layer=1, encoder_head=2, decoder_layer=1, decoder_head=2)


def test_the_byte_count_sees_what_the_bf16_residual_stream_saves():
    """The README's claim in small: the same step with the fp32 stream moves more bytes per image."""
    model, loss_fn = build("finetune", dict(TINY, emb_dim=16))
    bf16 = bytes_per_image(model, loss_fn, 4)
    with fp32_stream(True):
        fp32 = bytes_per_image(model, loss_fn, 4)
    assert 0 < bf16["mb_per_image"] < fp32["mb_per_image"]
    assert bf16["kernels"] > 0 and bf16["graph_breaks"] == fp32["graph_breaks"] == 0


def test_the_gpu_check_checks_every_variant_without_a_gpu():
    result = subprocess.run(["bash", os.path.join(ROOT, "benchmarks", "gpu_check.sh")], capture_output=True,
                            text=True, timeout=120, env={**os.environ, "DRY_RUN": "1", "PYTHON": sys.executable})
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("checked 7 variants: pretrain-fp32-stream-1024, pretrain-bf16-stream-1024, "
                                    "pretrain-small-decoder-1024")


def test_every_mutant_of_the_mutation_check_still_finds_its_text():
    """tools/mutation_check.py refuses a mutant whose text is gone, so a rename in the code would be found only
    there. (The mutation check leaves this test out: in its mutated copy it would fail on every mutant.)"""
    from tools.mutation_check import MUTANTS, ROOT
    for name, (path, text, _) in MUTANTS.items():
        with open(os.path.join(ROOT, path), encoding="utf-8") as f:
            assert f.read().count(text) == 1, name
