"""The CIFAR-10 demo: data, the seed's two networks, training with periodic checkpoints (and timm's EMA online),
and scoring. It shows the engine at work; the engine never imports it.
"""

# The architectures the demo trains (:data:`ckpt_ema.cifar.models.ARCHS` builds them), named here without torch.
ARCH_NAMES = ("net", "resnet")
