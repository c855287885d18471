"""``lightning_reweight.models`` loads its modules on first use: the classifier alone does not import
segmentation-models-pytorch, and every public name (what a LightningCLI ``class_path`` names) still resolves."""

import subprocess
import sys

import pytest

import lightning_reweight.models as models


def test_classifier_does_not_import_smp():
    code = ("import sys; from lightning_reweight.models import ImageClassifier, unpack_batch; "
            "import lightning_reweight.models.classifier; "
            "print('segmentation_models_pytorch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False", out.stderr


def test_every_public_name_resolves_and_is_listed():
    from lightning_reweight.models.segmenter import SegmentationModule

    assert models.SegmentationModule is SegmentationModule
    for name in models.__all__:
        assert getattr(models, name).__name__ == name
        assert name in dir(models)
    with pytest.raises(AttributeError, match="no attribute 'Segmenter'"):
        models.Segmenter  # noqa: B018
