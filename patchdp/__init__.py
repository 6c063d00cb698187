"""patchdp."""
