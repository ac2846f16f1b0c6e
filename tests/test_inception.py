"""Our Inception FID equals torch-fidelity's on the same images with the same (seeded random) weights file.

The real Inception weights cannot be downloaded here, so a torch-fidelity `inception-v3-compat` network with seeded
random weights stands in; its batch-norm statistics are set from a batch of digits so that its features are not
vanishingly small. Equal FIDs check the whole path: uint8 handling, the resize to 299x299, channel repetition.
"""

import torch
import torch_fidelity
from torch_fidelity import feature_extractor_inceptionv3 as fidelity_inception

from diffusion_lit.data.digits import shipped_digits
from diffusion_lit.training.metrics import ImageFeatures, compute, extract, fid_and_kid


def random_inception_weights(path, calibration: torch.Tensor) -> None:
    """Saves torch-fidelity's InceptionV3 with seeded random weights (no download) to `path`."""
    torch.manual_seed(0)
    no_download = (lambda *args, **kwargs: {}, lambda self, state_dict, *args, **kwargs: None)
    saved = fidelity_inception.load_state_dict_from_url, fidelity_inception.FeatureExtractorInceptionV3.load_state_dict
    fidelity_inception.load_state_dict_from_url, fidelity_inception.FeatureExtractorInceptionV3.load_state_dict = no_download
    try:
        net = fidelity_inception.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    finally:
        fidelity_inception.load_state_dict_from_url, fidelity_inception.FeatureExtractorInceptionV3.load_state_dict = saved
    net.train()
    for module in net.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.reset_running_stats()
            module.momentum = None  # a plain average over the calibration batch
    with torch.no_grad():
        net(calibration.expand(-1, 3, -1, -1))
    torch.save(net.state_dict(), path)


class ThreeChannels(torch.utils.data.Dataset):
    """uint8 grayscale images as torch-fidelity takes them: [3, H, W] uint8, the channel repeated by the caller."""

    def __init__(self, images: torch.Tensor) -> None:
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.images[i].expand(3, -1, -1).contiguous()


def test_our_inception_fid_equals_torch_fidelitys(tmp_path):
    images, labels = shipped_digits()
    weights = tmp_path / "random_inception.pth"
    random_inception_weights(weights, images[-8:])  # 8 images x 35x35 positions and more: batch-norm statistics
    n = 12  # each Inception call costs a 299x299 image: few images keep the test short
    low, high = images[labels < 5][:n], images[labels >= 5][:n]  # two sets that differ

    features = ImageFeatures("inception", str(weights))
    fid, kid = fid_and_kid(2048, n // 2)
    for metric in (fid, kid):
        metric.update(extract(features, high, 16), real=True)  # grayscale: ImageFeatures repeats the channel itself
        metric.update(extract(features, low, 16), real=False)
    ours = compute(fid, kid)["fid"]

    theirs = torch_fidelity.calculate_metrics(
        input1=ThreeChannels(low), input2=ThreeChannels(high), fid=True, feature_extractor="inception-v3-compat",
        feature_extractor_weights_path=str(weights), batch_size=16, cuda=False, verbose=False,
    )["frechet_inception_distance"]
    assert ours > 1  # the sets differ, and the random network sees it
    assert abs(ours - theirs) / theirs < 1e-3, (ours, theirs)
