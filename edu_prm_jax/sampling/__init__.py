"""EDU tree sampling: decoding loop, entropy anchors, symbol set."""
