"""Enrolment as one call, shared by the command line and the UIs' enrol dialogs.

The caller supplies the admin passphrase; this checks it (creating the registry on first use),
finds the usable face in each photo, embeds it with every backend available here, and stores
the person in one transaction. Photos are never stored.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence

from .faces.backends import available_backends
from .faces.enrol import PhotoCheck, embed_photos
from .models import ModelError, ModelResolver
from .policy import Policy
from .registry import (Consent, Identity, Registry, RegistryError, RegistryExists,
                       registry_paths)


class EnrolmentRefused(RegistryError):
    """No photo was usable; `checks` says why for each."""

    def __init__(self, checks: List[PhotoCheck]):
        self.checks = checks
        super().__init__("No photo was usable, nothing was enrolled: " + "; ".join(
            f"{c.source}: {c.reason}" for c in checks))


@dataclass
class Enrolment:
    identity: Identity
    checks: List[PhotoCheck]
    backends: List[str]  # backend names the embeddings were made with
    notes: List[str]  # backends that could not be used, and why


def open_admin(db: Path, key: Path, passphrase: str, create: bool = True,
               key_file: bool = True, home: Optional[Path] = None) -> Registry:
    """The registry opened with the admin passphrase; created (with a key file beside it for
    unattended matching, unless `key_file` is False) when absent and `create`. When another
    process creates it at the same moment (two first enrolments), this one opens theirs: with
    the same passphrase it simply adds to it, with another it gets a clear LockedError."""
    if create and not db.exists():
        try:
            reg = Registry.create(db, passphrase, key_file=key if key_file else None)
        except RegistryExists:
            pass
        else:  # from now on its absence refuses (expect.py), whoever never set an admin
            if home is not None:
                from . import expect
                expect.note_registry(home, db, key)
            return reg
    return Registry.open(db, passphrase=passphrase)


def enrol_person(policy: Policy, home: Path, passphrase: str, *, name: str, scope: str,
                 consent: Consent, photos: Sequence, aliases: Sequence[str] = (),
                 add_to: str = "", model_dirs: Sequence[Path] = (),
                 insightface_dirs: Sequence[Path] = (), registry_path: Path = None,
                 key_file: bool = True) -> Enrolment:
    """Enrol `name` from `photos` (paths or RGB arrays), or add the photos to the person named
    by `add_to`. Raises EnrolmentRefused, RegistryError (LockedError for a wrong passphrase)
    or ModelError; nothing is stored unless it succeeds."""
    db, key = registry_paths(policy, home)
    if registry_path is not None:
        db, key = Path(registry_path), Path(registry_path).with_name(key.name)
    if db.exists():  # check the passphrase before spending time on the photos
        Registry.open(db, passphrase=passphrase).close()
    backends, notes = available_backends(policy, ModelResolver(policy.model_paths, model_dirs),
                                         insightface_dirs)
    if not backends:
        raise ModelError("No face backend can run here: " + " | ".join(notes))
    embeddings, checks = embed_photos(photos, backends, policy.max_pixels, policy.detect_size)
    if not embeddings:
        raise EnrolmentRefused(checks)
    with open_admin(db, key, passphrase, create=not add_to, key_file=key_file,
                    home=home) as reg:
        notes += _lookalikes(reg, backends, embeddings, add_to)
        if add_to:
            ident = reg.find(add_to)
            reg.add_embeddings(ident.id, embeddings)
            ident = reg.find(ident.id)
        else:
            ident = reg.add(name, scope, consent, embeddings, aliases)
    return Enrolment(ident, checks, [b.name for b in backends], notes)


def _lookalikes(reg: Registry, backends, embeddings, add_to: str) -> List[str]:
    """Warn when the new photos match someone already enrolled (the same person twice, or the
    wrong person's photo): the admin should know, though it is not refused."""
    from .faces.matching import Gallery

    backend = backends[0]
    vectors = embeddings.get(backend.embedder.model_id)
    if vectors is None:
        return []
    gallery = Gallery.from_registry(reg.embeddings(backend.embedder.model_id))
    names = {i.id: i.name for i in reg.identities()}
    own = reg.find(add_to).id if add_to else None
    hits = {m.identity for m in gallery.match(vectors, backend.embedder.threshold)
            if m is not None and m.identity != own}
    return [f"these photos also match {names[i]} ({i}), who is already enrolled: check that "
            f"the right person's photos were used" for i in sorted(hits)]
