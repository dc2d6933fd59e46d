"""irdro: hard-sample reweighted continual training (IR-DRO, MidRanking) on DeepSpeed ZeRO-3."""

__version__ = "0.1.0"
