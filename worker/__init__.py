"""Emotion worker: faces in camera frames from MQTT, emotion events back to MQTT."""

__version__ = "0.1.0"
