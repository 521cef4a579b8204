"""The torch side: models, tokenised tasks, one DP-SGD loop, SLMs, synthesis."""
