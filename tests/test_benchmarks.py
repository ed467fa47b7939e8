"""The benchmarks' own checks that need no GPU: inductor's byte count, and the prepared GPU check's dry run."""
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
