"""The engine: the only place that decides. Adapters hand it pixels and act on its Verdict."""
from __future__ import annotations

import dataclasses
import logging
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from . import censor
from .detectors.base import ImageScorer, PartDetector
from .explicit import check_explicit
from .faces.stage import (DETECT_SIZE, FaceStage, apply_identity_rules, detection_copies,
                          faces_in_copies, input_rules, turned_findings)
from .imageio import ImageInputError, iter_image_frames, to_rgb_uint8
from .minors import apply_minor_rule, needs_age_check, with_age
from .models import ModelError, ModelResolver, onnx_session, paired_threads
from .policy import Policy
from .registry import RegistryError
from .prepare import WORK_SIZE, PreparedImage
from .verdict import Decision, FaceFinding, Verdict

log = logging.getLogger("consent_guard")
FILE_CHUNK = 8  # frames of one file checked together (check_file)


def _prompt_settings(policy: Policy) -> tuple:
    """What the loaded prompt checker depends on: two policies with the same share one."""
    return (policy.prompt_classifier, policy.prompt_classifier_threshold,
            policy.prompt_confirm_words)


class Engine:
    """Checks images against a policy. Detectors are loaded on first use; if they cannot be,
    every check fails closed with the loader's message."""

    def __init__(self, policy: Optional[Policy] = None, *, parts: Optional[PartDetector] = None,
                 scorer: Optional[ImageScorer] = None, model_dirs: Sequence[Path] = (),
                 registry=None, face_backend=None, insightface_dirs: Sequence[Path] = (),
                 age_estimator=None):
        """`registry`: an open Registry (or None: no one is protected, the face stage is off).
        `face_backend`: a FaceBackend to use instead of choosing one (tests, benchmarks).
        `age_estimator`: an AgeEstimator (faces/age.py) to use instead of the default model."""
        self.policy = policy or Policy()
        self._parts, self._scorer = parts, scorer
        self._model_dirs = list(model_dirs)
        self._lock = threading.Lock()
        self.registry = registry
        self._injected_backend = face_backend
        self._chosen_backend = None
        self._insightface_dirs = list(insightface_dirs)
        self._age_estimator = age_estimator
        self._faces: Optional[FaceStage] = None
        self._faces_generation: Optional[int] = None
        self.face_notes: List[str] = []  # what the admin should know about matching coverage
        self._prompt_parts = None
        self._names: List[Tuple[str, str]] = []
        self._names_generation: Optional[int] = None
        self.audit = None  # an audit.AuditLog the adapters record decisions in (or None)

    def with_policy(self, policy: Policy) -> "Engine":
        """An engine for another policy (a node's override) that shares this one's loaded
        models and registry, so nothing is loaded twice."""
        other = Engine(policy, parts=self._parts, scorer=self._scorer,
                       model_dirs=self._model_dirs, registry=self.registry,
                       face_backend=self._injected_backend or self._chosen_backend,
                       insightface_dirs=self._insightface_dirs,
                       age_estimator=self._age_estimator)
        other.audit = self.audit
        if _prompt_settings(policy) == _prompt_settings(self.policy):  # else loaded its own way
            other._prompt_parts = self._prompt_parts
        return other

    def load(self) -> None:
        """Load the default detectors now (raises ModelError with the fix if one is missing)."""
        with self._lock:
            if self._parts is not None and self._scorer is not None:
                return
            from .detectors.nudenet import NudeNetDetector
            from .detectors.opennsfw import OpenNSFWScorer

            resolver = ModelResolver(self.policy.model_paths, self._model_dirs)
            threads = paired_threads()  # the two run side by side (explicit.py)
            if self._parts is None:
                self._parts = NudeNetDetector(onnx_session(
                    resolver.resolve("nudenet_320n"), self.policy.device, threads))
            if self._scorer is None:
                self._scorer = OpenNSFWScorer(onnx_session(
                    resolver.resolve("open_nsfw"), self.policy.device, threads))

    def face_backend(self):
        """The face backend matching runs with (chosen and loaded on first use)."""
        if self._injected_backend is not None:
            return self._injected_backend
        with self._lock:
            if self._chosen_backend is None:
                from .faces.backends import choose_backend

                enrolled = {i.id: set(i.models) for i in self.registry.identities()} \
                    if self.registry is not None else {}
                resolver = ModelResolver(self.policy.model_paths, self._model_dirs)
                self._chosen_backend, self.face_notes = choose_backend(
                    self.policy, resolver, self._insightface_dirs, enrolled)
                for note in self.face_notes:
                    log.warning("Consent Guard: %s", note)
            return self._chosen_backend

    def age_estimator(self):
        """The age estimator the minors rule runs (loaded on first use; a ModelError, with the
        fix, when its weights are missing: the images that need it are then blocked)."""
        with self._lock:
            if self._age_estimator is None:
                from .faces.age import load_age_estimator

                resolver = ModelResolver(self.policy.model_paths, self._model_dirs)
                self._age_estimator = load_age_estimator(resolver, self.policy.device)
            return self._age_estimator

    def face_stage(self) -> Optional[FaceStage]:
        """The face stage with the registry's current embeddings, or None when nobody is
        enrolled. Reloaded when the registry changes (another process may have enrolled)."""
        if self.registry is None:
            return None
        generation = self.registry.generation
        if self._faces is not None and generation == self._faces_generation:
            return self._faces
        if not self.registry.model_ids():
            self._faces, self._faces_generation = None, generation
            return None
        from .faces.matching import Gallery

        if self._faces_generation is not None:  # the registry changed: coverage may differ
            self._chosen_backend = None
        backend = self.face_backend()
        gallery = Gallery.from_registry(self.registry.embeddings(backend.embedder.model_id))
        self._faces = FaceStage(backend.detector, backend.embedder, lambda: gallery,
                                self.policy.min_face_px, self.policy.detect_size)
        self._faces_generation = generation
        return self._faces

    def check_images(self, pixels: Sequence[np.ndarray],
                     full_size: Optional[Tuple[int, int]] = None) -> List[Verdict]:
        """One verdict per image; the batch goes through each model together. Never raises for
        a bad image or a failing model: that image's verdict is a block that says why.
        `full_size` is given when the pixels were decoded at reduced scale (regions are
        reported in full-size pixels).

        The checks: explicit content (explicit.py); then, for an image the explicit check did
        not call plainly safe, the minors rule (minors.py): its faces are found and their ages
        estimated, and if anyone may be under 18 the image is blocked whatever [actions] says
        (with minor_unknown = "block", a face too small or blurred to tell counts as a minor;
        if the age model cannot load, such an image is blocked with the reason). An explicit
        image with no face at all follows the normal policy. Then protected identities, when
        anyone is enrolled (faces/stage.py)."""
        verdicts: List[Optional[Verdict]] = [None] * len(pixels)
        prepared, index, rgbs = [], [], []
        for i, px in enumerate(pixels):
            try:
                rgb = self._usable(px)
                prepared.append(PreparedImage(rgb, full_size))
                index.append(i)
                rgbs.append(rgb)
            except ImageInputError as exc:
                verdicts[i] = Verdict.failed(f"unusable image: {exc}")
        if prepared:
            ahead = None
            try:
                self.load()
                stage = self.face_stage()
                ahead = self._faces_ahead(rgbs, full_size, stage)
                results = check_explicit(prepared, self._parts, self._scorer, self.policy)
            except Exception as exc:  # fail closed: a check that cannot run blocks the image
                results, stage = [self._failure(exc)] * len(prepared), None
            early = ahead.result() if ahead is not None else [None] * len(rgbs)
            results = [self._faces_and_minors(v, rgb, full_size, stage, work)
                       for v, rgb, work in zip(results, rgbs, early)]
            for i, v in zip(index, results):
                verdicts[i] = v
        return verdicts  # type: ignore[return-value]

    def check_input_images(self, pixels: Sequence[np.ndarray],
                           full_size: Optional[Tuple[int, int]] = None) -> List[Verdict]:
        """For img2img, inpainting and face-swap sources: a photo of someone protected under
        scope `any` is refused. Fails closed like check_images."""
        verdicts: List[Verdict] = []
        for px in pixels:
            try:
                rgb = self._usable(px)
                allowed = Verdict(Decision.ALLOW, rule="no protected identity in the input")
                verdicts.extend(self._with_faces([allowed], [rgb], full_size,
                                                 lambda v, faces: input_rules(faces)))
            except ImageInputError as exc:
                verdicts.append(Verdict.failed(f"unusable image: {exc}"))
            except Exception as exc:
                verdicts.append(self._failure(exc))
        return verdicts

    def check_input_image(self, pixels: np.ndarray) -> Verdict:
        return self.check_input_images([pixels])[0]

    def _usable(self, px) -> np.ndarray:
        rgb = to_rgb_uint8(px)
        h, w = rgb.shape[:2]
        if h * w > self.policy.max_pixels:
            raise ImageInputError(f"too large to check: {w}x{h}, over the policy limit "
                                  f"of {self.policy.max_pixels} pixels")
        return rgb

    def _faces_ahead(self, rgbs: Sequence[np.ndarray], full_size: Optional[Tuple[int, int]],
                     stage: Optional[FaceStage]) -> Optional[Future]:
        """When anyone is enrolled, the images' faces found, matched and (for an image where
        nobody matched) searched for in turned and cleaned copies (_FaceWork), on a thread of
        their own while the explicit models run: the protected-identity check does not
        depend on their verdict. The two share the CPUs better than one after the other
        (2 cores: 0.94x the time on 65 face photos, interleaved in one process on a loaded
        machine, bench/speed.py --cases faces --stages; 0.81x for the models and the upright
        faces alone on a quiet one).
        Waited for even when the explicit check raises: no work is left running on the
        pixels. A future of one _FaceWork per image, or None: nobody enrolled, or a policy
        whose minors rule would look for faces on a larger copy than matching does (its
        detection then waits for the verdict, as before)."""
        if stage is None or self.policy.detect_size < DETECT_SIZE:
            return None
        pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="consent-guard")
        try:
            return pool.submit(lambda: [self._face_work(rgb, full_size, stage,
                                                        self.policy.detect_size)
                                        for rgb in rgbs])
        finally:
            pool.shutdown(wait=False)

    def _face_work(self, rgb: np.ndarray, full_size: Optional[Tuple[int, int]],
                   stage: Optional[FaceStage], size: int) -> "_FaceWork":
        """The faces of one image found on copies of `size`, those large enough matched when
        anyone is enrolled, and, when none of them matches, the turned and cleaned copies'
        findings (turned_findings). Never raises: what went wrong is kept for the caller."""
        try:
            to_full = full_size[0] / rgb.shape[1] if full_size else 1.0
            detector = stage.detector if stage is not None else self.face_backend().detector
            copies = detection_copies(rgb, size, self.policy.min_face_px / to_full)
            faces = faces_in_copies(detector, copies)  # detect_faces, the copies kept
            matched, searched = {}, []
            if stage is not None:
                big = [i for i, f in enumerate(faces) if f.size * to_full >= stage.min_face_px]
                embedded = [faces[i] for i in big]
                matched = dict(zip(big, stage.match(rgb, embedded, to_full)))
                if not any(f.identity for f in matched.values()):  # turned or inverted copies
                    same = (size == stage.detect_size
                            and self.policy.min_face_px == stage.min_face_px)
                    searched = turned_findings(stage, rgb, to_full, copies if same else None,
                                               seen=embedded)
            return _FaceWork(size, faces, matched, searched)
        except Exception as exc:
            return _FaceWork(size, error=exc)

    def _faces_and_minors(self, verdict: Verdict, rgb: np.ndarray,
                          full_size: Optional[Tuple[int, int]],
                          stage: Optional[FaceStage], work: Optional["_FaceWork"] = None
                          ) -> Verdict:
        """The face checks of one output image, on one detection: the minors rule (when the
        explicit check did not call the image plainly safe, see minors.py) and the protected
        identities (when anyone is enrolled). `work`: that detection made ahead
        (_faces_ahead), used when it is on the copy this image needs. Never raises: a check
        that cannot run blocks this image and says why."""
        if verdict.error:
            return verdict
        try:
            age_check = needs_age_check(verdict, self.policy)
            if stage is None and not age_check:
                return verdict
            to_full = full_size[0] / rgb.shape[1] if full_size else 1.0
            # the minors rule never looks for faces on a smaller copy than the default
            size = max(self.policy.detect_size, DETECT_SIZE) if age_check \
                else self.policy.detect_size
            if work is None or work.size != size:
                work = self._face_work(rgb, full_size, stage, size)
            if work.error is not None:
                raise work.error
            faces = work.faces
            estimates = self.age_estimator().estimate(rgb, faces) if age_check and faces \
                else [None] * len(faces)
            findings = []
            for i, (face, est) in enumerate(zip(faces, estimates)):
                finding = work.matched.get(i)
                if finding is None and est is None:
                    continue
                if finding is None:
                    finding = FaceFinding(tuple(int(round(v * to_full)) for v in face.box),
                                          round(face.score, 4))
                findings.append(with_age(finding, est))
            if age_check:
                verdict = apply_minor_rule(verdict, findings, self.policy)
            if stage is not None:
                verdict = apply_identity_rules(verdict, findings + list(work.searched))
            return verdict
        except Exception as exc:  # fail closed
            return self._failure(exc)

    def _with_faces(self, verdicts: List[Verdict], rgbs: List[np.ndarray],
                    full_size: Optional[Tuple[int, int]], rule) -> List[Verdict]:
        """Run the face stage (when anyone is enrolled) and let `rule` combine each verdict
        with the faces found. Raises when the stage cannot run: the caller fails closed."""
        stage = self.face_stage()
        if stage is None:
            return verdicts
        out = []
        for verdict, rgb in zip(verdicts, rgbs):
            if verdict.error:
                out.append(verdict)
                continue
            to_full = full_size[0] / rgb.shape[1] if full_size else 1.0
            out.append(rule(verdict, stage.findings(rgb, to_full, turns=True)))
        return out

    @staticmethod
    def _failure(exc: Exception) -> Verdict:
        if isinstance(exc, (ModelError, RegistryError)):
            log.error("Consent Guard cannot check images: %s", exc)
            return Verdict.failed(str(exc))
        log.exception("Consent Guard check raised")
        return Verdict.failed(f"the check raised {type(exc).__name__}: {exc}")

    def check_prompt(self, text: str, negative: Optional[str] = None) -> Verdict:
        """Before any GPU time: the prompt's verdict (allow or block). The negative prompt
        never triggers anything. Fails closed like the image checks."""
        try:
            from .prompts.check import check_prompt

            lexicon, classifier = self._prompt_checker()
            return check_prompt(text, negative, lexicon=lexicon, classifier=classifier,
                                explicit_action=self.policy.prompt_explicit,
                                suggestive_action=self.policy.prompt_suggestive,
                                protected_names=self._protected_names())
        except Exception as exc:
            return self._failure(exc)

    def _prompt_checker(self):
        with self._lock:
            if self._prompt_parts is None:
                from .prompts.classifier import PromptClassifier
                from .prompts.lexicon import Lexicon

                classifier = PromptClassifier.load() if self.policy.prompt_classifier else None
                if classifier is not None and self.policy.prompt_classifier_threshold:
                    classifier.threshold = self.policy.prompt_classifier_threshold
                if classifier is not None and not self.policy.prompt_confirm_words:
                    classifier.corroborate = None  # check.py: no word is confirmed
                self._prompt_parts = (Lexicon.load(), classifier)
            return self._prompt_parts

    def _protected_names(self) -> List[Tuple[str, str]]:
        """(id, name) for every display name and alias in the registry, for the prompt check."""
        if self.registry is None:
            return []
        generation = self.registry.generation
        if self._names_generation != generation:
            self._names = [(i.id, n) for i in self.registry.identities()
                           for n in (i.name, *i.aliases)]
            self._names_generation = generation
        return self._names

    def check_image(self, pixels: np.ndarray) -> Verdict:
        return self.check_images([pixels])[0]

    def check_file(self, path: Path) -> Verdict:
        """Every frame of an image file; the strictest frame's verdict stands for the file."""
        # decode large enough to embed faces and estimate their ages well, not just to detect
        # them (the minors rule may need the faces of any image)
        draft = max(WORK_SIZE, 2 * self.policy.detect_size)
        worst: Optional[Verdict] = None
        chunk: List[np.ndarray] = []
        size = (0, 0)

        def strictest(verdicts: List[Verdict]) -> Verdict:
            return max(verdicts, key=lambda v: (v.error is not None, v.decision.rank))

        try:  # frames are decoded and checked a few at a time: an animation is never all
            for frame, size in iter_image_frames(path, self.policy.max_pixels, draft):
                chunk.append(frame)  # in memory at once
                if len(chunk) == FILE_CHUNK:
                    worst = strictest([v for v in (worst,) if v] +
                                      self.check_images(chunk, size))
                    chunk = []
        except ImageInputError as exc:
            return Verdict.failed(f"unusable image: {exc}")
        if chunk:
            worst = strictest([v for v in (worst,) if v] + self.check_images(chunk, size))
        return worst if worst is not None else Verdict.failed("unusable image: no frames")

    def render(self, pixels: np.ndarray, verdict: Verdict) -> Optional[np.ndarray]:
        """What may be written for this verdict: the image, a censored copy, or None (block)."""
        return censor.render(to_rgb_uint8(pixels), verdict, self.policy.censor_style,
                             self.policy.censor_margin)

    def output_for(self, pixels: np.ndarray, verdict: Verdict) -> np.ndarray:
        """What a UI shows in the image's place: the image, a censored copy or a placeholder."""
        out = None if verdict.error else self.render(pixels, verdict)
        if out is not None:
            return out
        h, w = np.asarray(pixels).shape[:2]
        return self.placeholder(w, h, verdict)

    @staticmethod
    def placeholder(width: int, height: int, verdict: Verdict) -> np.ndarray:
        """A stand-in image of the given size that says why the original is not shown, in
        words a user reads (never a label, a score or a name: messages.py)."""
        return censor.placeholder_for(max(width, 1), max(height, 1), verdict)


@dataclasses.dataclass
class _FaceWork:
    """One image's faces as Engine._face_work found them on copies of `size` px: the faces,
    the findings of those matched (by index; only when anyone is enrolled), the turned and
    cleaned copies' findings (when nobody matched), or the exception that stopped it."""
    size: int
    faces: List = dataclasses.field(default_factory=list)
    matched: Dict[int, FaceFinding] = dataclasses.field(default_factory=dict)
    searched: List[FaceFinding] = dataclasses.field(default_factory=list)
    error: Optional[Exception] = None


__all__ = ["Engine", "Decision", "Verdict"]
