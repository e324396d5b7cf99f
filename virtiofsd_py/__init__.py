"""virtiofsd-py: a hackable virtio-fs vhost-user back-end in Python."""

__version__ = "0.1.0"
