"""Tasks: the embedded default (review sentiment) and its shipped assets."""
