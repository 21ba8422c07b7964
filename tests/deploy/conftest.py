"""Checks of the deployment files (lock, image, compose, Kubernetes): no Docker, no network."""

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
