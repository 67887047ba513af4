"""bids_harmony: harmonize multi-site structural brain MRI as a BIDS-App."""

__version__ = "0.1.0"
