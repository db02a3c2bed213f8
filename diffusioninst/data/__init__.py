"""Datasets: COCO/LVIS readers, synthetic generator, transforms, loaders and Ray Data ingest."""
