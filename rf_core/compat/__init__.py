"""Other tools' APIs over rf, so code written for them runs here with its import lines changed."""
