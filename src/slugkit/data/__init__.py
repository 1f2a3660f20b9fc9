"""Data: webdataset shards, image folders, curation, and the embedded synthetic world."""
