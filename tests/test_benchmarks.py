"""The benchmarks' and tools' own checks that need no GPU: inductor's byte count, the prepared GPU check's dry
run, the mutation check's mutants."""
import os
import subprocess
import sys

from benchmarks.step_bytes import build, bytes_per_image
from conftest import ROOT

TINY = dict(image_size=4, patch_size=2, encoder_layer=1, encoder_head=2, decoder_layer=1, decoder_head=2)


def test_the_byte_count_is_positive_and_grows_with_the_model():
    counts = [bytes_per_image(*build("finetune", dict(TINY, emb_dim=width)), 4) for width in (8, 32)]
    narrow, wide = counts
    assert 0 < narrow["mb_per_image"] < wide["mb_per_image"]
    assert narrow["kernels"] > 0 and narrow["graph_breaks"] == wide["graph_breaks"] == 0


def test_the_gpu_check_checks_every_variant_without_a_gpu():
    result = subprocess.run(["bash", os.path.join(ROOT, "benchmarks", "gpu_check.sh")], capture_output=True,
                            text=True, timeout=120, env={**os.environ, "DRY_RUN": "1", "PYTHON": sys.executable})
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("checked 7 variants: pretrain-fp32-stream-1024, pretrain-bf16-stream-1024, "
                                    "pretrain-small-decoder-1024")


def test_every_mutant_of_the_mutation_check_still_finds_its_text():
    """tools/mutation_check.py refuses a mutant whose text is gone, so a rename in the code would be found only
    there. (Not in the fast tests the mutation check runs: in its mutated copy this would kill every mutant.)"""
    from tools.mutation_check import MUTANTS, ROOT
    for name, (path, text, _) in MUTANTS.items():
        with open(os.path.join(ROOT, path), encoding="utf-8") as f:
            assert f.read().count(text) == 1, name
