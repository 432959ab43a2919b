"""How the builders read a real download: the skip ceiling, missing videos, the Ego-Exo4D
views and description filters, the EgoClip video layout (docs/data.md, "Reading real
downloads"). The defaults read the demo world exactly as before these options existed.
"""

from __future__ import annotations

import dataclasses
import re
import string

__all__ = ["EGOCLIP_LAYOUTS", "BuildOptions", "CHUNK_SECONDS"]

#: Named EgoClip video layouts (``--egoclip-videos``); any other value is a template.
EGOCLIP_LAYOUTS = {
    # The demo world and today's default: one file per Ego4D video.
    "egoclip": "egoclip/videos/{video_uid}.mp4",
    # Ego4D's own download (``ego4d --datasets full_scale``): <root>/v1/full_scale/<uid>.mp4.
    "ego4d": "v1/full_scale/{video_uid}.mp4",
    # EgoVLP's utils/video_chunk.py output: 600 s chunks <uid>/<k>.mp4, k = start // 600.
    "egovlp_chunks": "ego4d_chunked/{video_uid}/{chunk}.mp4",
}

#: Length of EgoVLP's video chunks (``EgoClip_EgoMCQ.chunk_sec``), seconds.
CHUNK_SECONDS = 600

_TEMPLATE_FIELDS = {"video_uid", "chunk"}


@dataclasses.dataclass(frozen=True)
class BuildOptions:
    """Options of a build (recorded in the dataset's ``metadata.json`` as ``build_options``).

    Attributes:
      max_bad_fraction: abort a split when more than this fraction of its records is skipped
        (malformed, unusable or with a missing video); filtered records do not count.
        1.0 never aborts. Default 0.01.
      missing_videos: ``"skip"`` (default) drops a record whose video file is absent and
        counts it; ``"keep"`` keeps it and leaves it to the pipeline's ``on_bad_video``.
        EgoBench items are always kept (an evaluation set stays whole).
      ego_exo_downscaled: ``None`` (default) reads the full-size frame-aligned videos;
        ``448`` reads Ego-Exo4D's downscaled copies
        (``<take>/frame_aligned_videos/downscaled/448/<video>.mp4``).
      exo_cameras: regular expression a camera id must match (whole, case-insensitive) to
        be an exo view, besides ``is_ego`` false and a frame-aligned, non-collage video.
        Default ``(cam|gp)\\d+``: the static GoPros; the hand-held ``mobile`` camera is not.
      subjects: ``narration_subject`` values kept (``("C",)``: the camera wearer, default);
        ``()`` keeps every subject. A description without the field is kept.
      require_ego_visible: drop descriptions marked ``ego_visible`` false (default: keep).
      drop_unsure: drop descriptions marked ``unsure`` true (default: keep).
      egoclip_videos: a name of :data:`EGOCLIP_LAYOUTS` (default ``"egoclip"``) or a
        template with ``{video_uid}`` and optionally ``{chunk}`` (600 s chunks, times made
        relative to the chunk, as EgoVLP reads them).
    """

    max_bad_fraction: float = 0.01
    missing_videos: str = "skip"
    ego_exo_downscaled: int | None = None
    exo_cameras: str = r"(cam|gp)\d+"
    subjects: tuple[str, ...] = ("C",)
    require_ego_visible: bool = False
    drop_unsure: bool = False
    egoclip_videos: str = "egoclip"

    def __post_init__(self):
        if not 0.0 <= self.max_bad_fraction <= 1.0:
            raise ValueError(f"max_bad_fraction must be in [0, 1], got {self.max_bad_fraction}")
        if self.missing_videos not in ("skip", "keep"):
            raise ValueError(
                f"missing_videos must be 'skip' or 'keep', got {self.missing_videos!r}"
            )
        if self.ego_exo_downscaled is not None and not self.ego_exo_downscaled > 0:
            raise ValueError(
                f"ego_exo_downscaled must be a size such as 448, got {self.ego_exo_downscaled}"
            )
        try:
            re.compile(self.exo_cameras)
        except re.error as e:
            raise ValueError(f"exo_cameras {self.exo_cameras!r} is not a regex ({e})") from None
        object.__setattr__(self, "subjects", tuple(self.subjects))
        self.egoclip_template  # noqa: B018 (validates the layout)

    @property
    def egoclip_template(self) -> str:
        """The EgoClip video template: a named layout expanded, or the template itself."""
        template = EGOCLIP_LAYOUTS.get(self.egoclip_videos, self.egoclip_videos)
        try:
            names = {f for _, f, _, _ in string.Formatter().parse(template) if f is not None}
        except ValueError as e:
            names = {f"<{e}>"}
        if "video_uid" not in names or not names <= _TEMPLATE_FIELDS:
            raise ValueError(
                f"egoclip_videos {self.egoclip_videos!r} is neither a layout of "
                f"{sorted(EGOCLIP_LAYOUTS)} nor a template using {{video_uid}} (and optionally "
                "{chunk}), e.g. 'videos/{video_uid}.mp4'"
            )
        return template

    @property
    def egoclip_chunked(self) -> bool:
        """Whether EgoClip videos are EgoVLP's 600 s chunks."""
        return "{chunk}" in self.egoclip_template

    def exo_camera_ok(self, cam_id: str) -> bool:
        """Whether ``cam_id`` names a static exo camera (:attr:`exo_cameras`)."""
        return re.fullmatch(self.exo_cameras, cam_id, re.IGNORECASE) is not None
