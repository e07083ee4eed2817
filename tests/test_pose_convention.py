"""The head-pose convention the README and the JSON schema state (issue #18 item 8: the yaw sign is the opposite
of the common benchmarks' and was undocumented), checked on the rotation itself and on real photos."""

from __future__ import annotations

import math

import numpy as np
import torch

from facerecon.geometry import euler_to_rotation
from facerecon.imaging import load_image
from tests.conftest import REPO, need_shared


def _rotate(pitch: float = 0.0, yaw: float = 0.0, roll: float = 0.0) -> np.ndarray:
    return euler_to_rotation(torch.tensor([[math.radians(pitch), math.radians(yaw), math.radians(roll)]]))[0].numpy()


def test_the_rotation_moves_the_face_as_documented() -> None:
    forward, right = np.array([0.0, 0.0, 1.0]), np.array([1.0, 0.0, 0.0])  # the face looks along +z; x = viewer's right
    assert (_rotate(pitch=20) @ forward)[1] < -0.3, "positive pitch: the face turns down"
    assert (_rotate(yaw=20) @ forward)[0] > 0.3, "positive yaw: the face turns towards the image's right"
    assert (_rotate(roll=20) @ right)[1] > 0.3, "positive roll: the eye line turns counter-clockwise (y up)"


def test_real_photos_follow_the_convention(reconstructor) -> None:
    """In photo pixels (y down): a positive yaw puts the nose tip right of the eyes' midpoint, a positive roll puts
    the image-left eye corner lower than the image-right one; the detector's estimate has the same signs."""
    checked_yaw = checked_roll = 0
    for path in sorted(need_shared("data", "deep3d-examples").glob("*.[jp][pn]g")):
        rec = reconstructor.reconstruct(load_image(path), refine=False)[0]
        pose, lm = rec.pose_degrees(), rec.landmarks_photo
        iod = float(np.linalg.norm(lm[45] - lm[36]))
        if abs(pose["yaw"]) > 10:
            nose = (lm[30, 0] - (lm[36, 0] + lm[45, 0]) / 2) / iod
            assert np.sign(nose) == np.sign(pose["yaw"]), (path.name, pose, nose)
            assert np.sign(rec.face.pose[1]) == np.sign(pose["yaw"]), (path.name, pose, rec.face.pose)
            checked_yaw += 1
        if abs(pose["roll"]) > 5:
            tilt = (lm[36, 1] - lm[45, 1]) / iod
            assert np.sign(tilt) == np.sign(pose["roll"]), (path.name, pose, tilt)
            checked_roll += 1
    assert checked_yaw >= 6 and checked_roll >= 6, (checked_yaw, checked_roll)


def test_the_convention_is_documented_in_the_schema_and_the_readme() -> None:
    from facerecon.api.schemas import FaceResult

    fields = FaceResult.model_json_schema()["$defs"]["Pose"]["properties"]
    assert "positive: the face turns down" in fields["pitch"]["description"]
    assert "positive: the face turns towards the image's right" in fields["yaw"]["description"]
    assert "AFLW2000-3D" in fields["yaw"]["description"]
    assert "positive: the head tilts counter-clockwise" in fields["roll"]["description"]
    angle = FaceResult.model_json_schema()["$defs"]["CoefficientsOut"]["properties"]["angle"]["description"]
    assert "signs as `pose_degrees`" in angle
    readme = (REPO / "README.md").read_text()
    assert "R = Rz(roll) · Ry(yaw) · Rx(pitch)" in readme and "negate our yaw" in readme
