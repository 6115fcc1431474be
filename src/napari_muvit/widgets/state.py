"""What each dock panel shows and runs, as evented models without Qt.

One evented dataclass per panel (:class:`PredictState`, :class:`TrainState`), in the spirit of
napari's ``EventedModel`` + ``_qt`` split: the Qt views (:mod:`.predict`, :mod:`.train`) bind
their controls to these fields and react to their events; tests and scripts read and set the
fields directly.  ``state.events.<field>`` emits the new value whenever a field changes.

Adding an option to a panel is two lines: a field here (``setting(...)`` when it should
survive the session, with ``choices=`` for a combo box) and one ``form.<control>("field", ...)``
call in the view, which builds the control, shows the field and writes edits back.

Fields made with :func:`setting` are persisted (:mod:`._settings`, one JSON section per panel):
:meth:`PanelState.restored` reads them, :meth:`PanelState.save` writes them.  Values of the wrong
type or outside ``choices`` fall back to the default, so a stale settings file cannot put an
invalid choice into a panel.

The fields a panel lists in ``PER_KIND`` (the model) are also remembered per image kind
(:func:`image_kind`: grayscale, RGB, n-channel) in ``by_kind``: a 3-channel model chosen for RGB
slides is offered again for the next RGB slide, never for the next grayscale image.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from psygnal import evented

from napari_muvit.engine.device import AMP_CHOICES
from napari_muvit.engine.quick_choices import COLOR_SPACE_CHOICES, FOREST_LEVEL_CHOICES
from napari_muvit.widgets._models import BUNDLED, FOLDER, SESSION, ModelChoice
from napari_muvit.widgets._settings import load_section, save_section

DEVICES = ("auto", "cpu", "cuda", "mps")
PRECISIONS = AMP_CHOICES
MAX_RECENT = 6
MAX_KIND_CHANNELS = 8  # a leading axis up to this long may be channels (image_kind)
ENCODER = "encoder"  # ModelChoice kind of the train panel: the bundled pre-trained encoder

S = TypeVar("S", bound="PanelState")
# ``encode`` may return this to keep the stored value (e.g. a model that only lives in this
# session: the next session should open with the model chosen before it)
KEEP = object()


def setting(
    default: Any = dataclasses.MISSING,
    *,
    factory: Callable[[], Any] | None = None,
    choices: Sequence[Any] | None = None,
    encode: Callable[[Any], Any] | None = None,
    decode: Callable[[Any], Any] | None = None,
) -> Any:
    """A state field that is saved with the panel's settings.

    ``choices`` restricts the value (and lists the items of the control bound to it);
    ``encode``/``decode`` convert values that are not JSON (e.g. a :class:`ModelChoice`).
    """
    meta = {"persist": True, "choices": tuple(choices) if choices else None,
            "encode": encode, "decode": decode}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


def choices_of(state_type: type, name: str) -> tuple[Any, ...] | None:
    """The allowed values of field ``name`` (None when any value of its type is allowed)."""
    for f in dataclasses.fields(state_type):
        if f.name == name:
            return f.metadata.get("choices")
    raise AttributeError(f"{state_type.__name__} has no field {name!r}")


def image_kind(shape: Sequence[int], rgb: bool) -> str:
    """What kind of image a model must accept to run on a layer of data ``shape``.

    ``"rgb"``/``"rgba"`` for colour layers, ``"N-channel"`` for a leading axis of 2 to
    :data:`MAX_KIND_CHANNELS` entries (napari's one-layer ``(C, Y, X)``; the same key for a
    short stack, which is fine: it only selects what was used on such data before), else
    ``"grayscale"``.
    """
    if rgb:
        return "rgba" if shape and int(shape[-1]) == 4 else "rgb"
    if len(shape) >= 3 and 2 <= int(shape[0]) <= MAX_KIND_CHANNELS:
        return f"{int(shape[0])}-channel"
    return "grayscale"


class PanelState:
    """Settings persistence shared by the panel states (mixed into the evented dataclasses)."""

    SECTION: ClassVar[str] = ""
    PER_KIND: ClassVar[tuple[str, ...]] = ()  # fields remembered per image kind (``by_kind``)

    @classmethod
    def _persisted(cls) -> list[dataclasses.Field]:
        return [f for f in dataclasses.fields(cls) if f.metadata.get("persist")]

    @classmethod
    def restored(cls: type[S]) -> S:
        """A state with the stored settings of this panel (defaults where none/invalid)."""
        state = cls()
        fields = cls._persisted()
        defaults = {f.name: _encode(f, getattr(state, f.name)) for f in fields}
        stored = load_section(cls.SECTION, defaults)
        for f in fields:
            value = _decoded(f, stored[f.name])
            if value is not _INVALID:
                setattr(state, f.name, value)
        return state

    def remember_kind(self, kind: str) -> None:
        """Store the ``PER_KIND`` fields as the choice for images of ``kind``."""
        fields = [f for f in self._persisted() if f.name in self.PER_KIND]
        values = {f.name: _encode(f, getattr(self, f.name)) for f in fields}
        values = {k: v for k, v in values.items() if v is not KEEP}
        by_kind = dict(getattr(self, "by_kind", {}))
        if values and by_kind.get(kind) != {**by_kind.get(kind, {}), **values}:
            by_kind[kind] = {**by_kind.get(kind, {}), **values}
            self.by_kind = by_kind

    def recall_kind(self, kind: str) -> list[str]:
        """Set the ``PER_KIND`` fields remembered for ``kind``; returns the names changed."""
        stored = getattr(self, "by_kind", {}).get(kind)
        if not isinstance(stored, dict):
            return []
        changed = []
        for f in self._persisted():
            if f.name not in self.PER_KIND or f.name not in stored:
                continue
            default = _encode(f, f.default if f.default is not dataclasses.MISSING
                              else f.default_factory())
            raw = stored[f.name]
            if not isinstance(raw, type(default)):
                continue  # a hand-edited or stale file: keep what is there
            value = _decoded(f, raw)
            if value is not _INVALID and value != getattr(self, f.name):
                setattr(self, f.name, value)
                changed.append(f.name)
        return changed

    def settings(self) -> dict[str, Any]:
        """The persisted fields as JSON values."""
        return {f.name: _encode(f, getattr(self, f.name)) for f in self._persisted()}

    def save(self) -> Path | None:
        """Write the persisted fields (never raises; see :func:`._settings.save_section`)."""
        values = self.settings()
        keep = [name for name, value in values.items() if value is KEEP]
        if keep:
            defaults = {f.name: _encode(f, f.default) for f in self._persisted() if f.name in keep}
            values.update(load_section(self.SECTION, defaults))
        return save_section(self.SECTION, values)

    @classmethod
    def is_persisted(cls, name: str) -> bool:
        return any(f.name == name for f in cls._persisted())


_INVALID = object()


def _decoded(f: dataclasses.Field, value: Any) -> Any:
    """A stored JSON value as the field's value (``_INVALID`` when outside its choices)."""
    decode = f.metadata.get("decode")
    if decode is not None:
        value = decode(value)
    choices = f.metadata.get("choices")
    if choices is not None and value not in choices:
        return _INVALID
    return value


def _encode(f: dataclasses.Field, value: Any) -> Any:
    encode = f.metadata.get("encode")
    value = encode(value) if encode is not None else value
    return list(value) if isinstance(value, tuple) else value


def remember_folder(recent: Sequence[str], choice: ModelChoice) -> list[str]:
    """``recent`` with a folder choice moved to the front (at most :data:`MAX_RECENT`)."""
    if choice.kind != FOLDER:
        return list(recent)
    return [choice.value, *[p for p in recent if p != choice.value]][:MAX_RECENT]


def _predict_model_decode(text: str) -> ModelChoice:
    return ModelChoice.from_setting(text)


def _model_encode(choice: ModelChoice) -> Any:
    return KEEP if choice.kind == SESSION else choice.to_setting()


def train_start_from_setting(text: str) -> ModelChoice:
    """A stored train start choice (session models do not outlive the session)."""
    kind, _, value = str(text).partition(":")
    if kind in (ENCODER, BUNDLED):
        return ModelChoice(kind)
    if kind == FOLDER and value:
        return ModelChoice(FOLDER, value)
    return ModelChoice(ENCODER)


# ---------------------------------------------------------------------------------------------
# predict panel
# ---------------------------------------------------------------------------------------------


@evented
@dataclass(eq=False)
class PredictState(PanelState):
    """The predict panel: what the user chose and what runs.

    ``view_job`` / ``image_job`` are the current (or last) :class:`~.jobs.Job` of each kind;
    a new job replaces the field, so ``events.view_job`` fires once per started view job.
    """

    SECTION: ClassVar[str] = "predict"
    PER_KIND: ClassVar[tuple[str, ...]] = ("model",)

    image: str | None = None  # name of the image layer to segment
    model: ModelChoice = setting(ModelChoice(BUNDLED), encode=_model_encode,
                                 decode=_predict_model_decode)
    by_kind: dict[str, Any] = setting(factory=dict)  # image kind -> {"model": ...}
    recent_models: list[str] = setting(factory=list)
    device: str = setting("auto", choices=DEVICES)
    precision: str = setting("auto", choices=PRECISIONS)
    confidence: bool = setting(False)
    uncertainty: bool = setting(False)  # uncertainty layer: where a stroke would help most
    tile_cap: int = setting(64)  # live: new tiles per view until a tile time is measured
    live_seconds: int = setting(5)  # live: time budget per view (centre first), seconds
    threads: int = setting(0)  # torch threads shared by the panels' jobs (0 = cores - 1)
    overlap: int = setting(-1)  # auto: blended, tile size / 8 (/ 4 for a forest): no seams (docs/benchmarks.md)
    batch_size: int = setting(0)  # 0 = automatic
    output: str = ""  # whole-image store ("" = a default next to the image)
    output_dir: str = setting(str(Path.home() / "napari-muvit"))
    overwrite: bool = setting(False)
    # whole image into the selected layer's own OME-Zarr as labels/<labels_name>
    into_source: bool = setting(False)
    labels_name: str = setting("muvit")
    source_ome: str = ""  # that OME-Zarr image ("" = the layer did not come from one)
    live: bool = False
    # a fine-tuning run of the same viewer: switch to its model at its first snapshot
    follow_session: str | None = None

    status: str = ""
    model_info: str = ""
    model_problem: bool = False  # model_info describes why the model cannot be used
    progress: tuple[int, int] = (0, 1)  # (done, total) of the running job
    view_job: Any = None
    image_job: Any = None

    def jobs(self) -> list[Any]:
        return [j for j in (self.view_job, self.image_job) if j is not None]

    @property
    def running(self) -> bool:
        """Whether a job of this panel is still running."""
        return any(not j.done.is_set() for j in self.jobs())


# ---------------------------------------------------------------------------------------------
# train panel
# ---------------------------------------------------------------------------------------------


@evented
@dataclass(eq=False)
class TrainState(PanelState):
    """The fine-tune panel: data, starting model, hyper-parameters and the running job."""

    SECTION: ClassVar[str] = "train"
    # the colour space only means something for RGB images: "lab" chosen for an RGB slide must
    # not follow the user to the next grayscale image
    PER_KIND: ClassVar[tuple[str, ...]] = ("start", "color_space")

    image: str | None = None
    labels: str | None = None
    points: str | None = None  # Points layer: clicked points train a point detector
    validation: str | None = None  # Shapes layer whose first rectangle is held out
    start: ModelChoice = setting(ModelChoice(ENCODER), encode=_model_encode,
                                 decode=train_start_from_setting)
    by_kind: dict[str, Any] = setting(factory=dict)  # image kind -> {"start": ...}
    recent_models: list[str] = setting(factory=list)
    class_names: str = setting("")
    # a new head: "forest" answers in seconds; "mlp" is then fine-tuned with the encoder
    classifier: str = setting("forest", choices=("forest", "mlp"))
    # the quick fit: which levels the forest reads, what the filters see of RGB ("auto": the
    # engine chooses; see TrainConfig.forest_levels/color_space)
    forest_levels: str = setting("auto", choices=FOREST_LEVEL_CHOICES)
    color_space: str = setting("auto", choices=COLOR_SPACE_CHOICES)
    steps: int = setting(200)
    lr: float = setting(1e-4)
    batch_size: int = setting(4)
    crop_size: int = setting(0)  # 0 = the model's default
    publish_every: int = setting(25)
    # the predict panel shows where a stroke would help most while training (uncertainty layer)
    show_uncertainty: bool = setting(True)
    device: str = setting("auto", choices=DEVICES)
    annotation_dir: str = setting(str(Path.home() / "napari-muvit" / "annotations"))

    status: str = ""
    progress: tuple[int, int] = (0, 1)  # (step, steps)
    job: Any = None  # the current (or last) TrainJob
    model: Any = None  # the latest published snapshot of the model being trained

    def jobs(self) -> list[Any]:
        return [] if self.job is None else [self.job]

    @property
    def running(self) -> bool:
        return self.job is not None and not self.job.done.is_set()

    def class_name_map(self) -> dict[int, str]:
        """``{1: first name, 2: second, ...}`` from the comma-separated class names."""
        names = [n.strip() for n in self.class_names.split(",")]
        return {i + 1: n for i, n in enumerate(names) if n}
