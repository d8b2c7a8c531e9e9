"""The app's screens, one per mode: chat, devices, train, models."""
