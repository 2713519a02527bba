"""Faces: detection, embedding and matching against the protected-identity registry."""
