"""The 3D view of a scan: one surface mesh of a thresholded, downsampled volume, as a plotly figure.

Light by construction: the volume is averaged down to at most `GRID_SIDE` voxels along its
longest physical axis, the surface has at most `MAX_FACES` triangles, and coordinates travel
as float32 / uint16 binary arrays, so the figure's JSON stays well under 2 MB for any input.
"""

from __future__ import annotations

import math

import numpy as np
import plotly.graph_objects as go
from skimage.filters import threshold_otsu
from skimage.measure import marching_cubes

from .preprocess import open_range
from .volume import Volume

GRID_SIDE = 64  # voxels along the longest physical axis of the grid the surface is drawn from
MAX_FACES = 40_000  # triangles sent to the browser (≈ 1 MB of JSON)
CT_BONE_HU = 300.0  # cortical and trabecular bone, the default CT surface
CT_SKIN_HU = -300.0  # air/soft-tissue boundary: the body surface, when a scan holds little bone
MIN_BONE_FRACTION = 0.002  # of the grid's voxels, above CT_BONE_HU, for the bone surface to be worth showing
PET_FRACTION_OF_MAX = 0.4  # PET: the usual 40 %-of-maximum contour, which outlines hot spots

_COLOURS = {"CT": "#e8dcc4", "MR": "#c9b8d8", "PT": "#f2a65a"}  # bone ivory, brain lilac, uptake amber


def surface_grid(volume: Volume) -> tuple[np.ndarray, tuple[float, float, float]]:
    """The volume block-averaged to ≤ GRID_SIDE voxels along its longest physical axis.

    Returns (grid (z, y, x) float32, grid spacing (z, y, x) in mm). Non-finite voxels become the
    volume's lowest finite value. Works slab by slab, so a 512×512×300 CT needs no full copy.
    """
    data = volume.data
    extent = [n * s for n, s in zip(data.shape, volume.spacing, strict=True)]
    voxel_mm = max(extent) / GRID_SIDE
    factors = [max(1, min(n, round(voxel_mm / s))) for n, s in zip(data.shape, volume.spacing, strict=True)]
    fz, fy, fx = factors
    nz, ny, nx = (n // f for n, f in zip(data.shape, factors, strict=True))
    grid = np.empty((nz, ny, nx), dtype=np.float32)
    pool = np.max if volume.modality == "PT" else np.mean  # PET: a small hot spot must not average away
    for z in range(nz):
        slab = np.asarray(data[z * fz:(z + 1) * fz, :ny * fy, :nx * fx], dtype=np.float32)
        grid[z] = pool(slab.reshape(fz, ny, fy, nx, fx), axis=(0, 2, 4))
    finite = np.isfinite(grid)
    if not finite.all():
        grid[~finite] = grid[finite].min() if finite.any() else 0.0
    spacing = tuple(float(s * f) for s, f in zip(volume.spacing, factors, strict=True))
    return grid, spacing  # type: ignore[return-value]


def default_threshold(volume: Volume, grid: np.ndarray | None = None) -> float:
    """The surface a viewer opens with, per modality.

    CT: bone (300 HU), or the body surface (−300 HU) when there is little bone; PET: 40 % of the way from
    the 1st to the 99.9th percentile (hot spots); MR and others: Otsu's threshold (the head or body outline).
    """
    grid = surface_grid(volume)[0] if grid is None else grid
    if volume.modality == "CT":
        bone_fraction = float((grid > CT_BONE_HU).mean())
        return CT_BONE_HU if bone_fraction >= MIN_BONE_FRACTION else CT_SKIN_HU
    if volume.modality == "PT":
        low, high = np.percentile(grid, [1.0, 99.9])
        return float(low + PET_FRACTION_OF_MAX * (high - low))
    if float(grid.max()) <= float(grid.min()):
        return float(grid.min())
    return float(threshold_otsu(grid.astype(np.float64)))  # float64: a float32 grid's range can overflow float32


def threshold_range(volume: Volume, grid: np.ndarray | None = None) -> tuple[float, float, float]:
    """(minimum, maximum, step) for a threshold slider: the grid's 0.5–99.9 percentile range."""
    grid = surface_grid(volume)[0] if grid is None else grid
    low, high = open_range(*(float(v) for v in np.percentile(grid, [0.5, 99.9])))
    step = 10 ** math.floor(math.log10((high - low) / 200))  # ~200–2000 positions, a round step
    return math.floor(low / step) * step, math.ceil(high / step) * step, float(step)


def figure_3d(volume: Volume, threshold: float | None = None) -> go.Figure:
    """A surface mesh of `volume` at `threshold` (None: `default_threshold`), in RAS millimetres.

    The camera looks at the patient from the front (patient's right on the viewer's left), head up.
    A threshold with no surface gives an empty figure that says so.
    """
    grid, spacing = surface_grid(volume)
    level = default_threshold(volume, grid) if threshold is None else float(threshold)
    figure = go.Figure()
    mesh = _surface(grid, spacing, level)
    if mesh is None:
        figure.add_annotation(text=f"No surface at threshold {level:g}: move the threshold slider.",
                              showarrow=False, font={"size": 14})
        figure.update_xaxes(visible=False)  # the sentence alone, not on an empty chart's grid and numbers
        figure.update_yaxes(visible=False)
    else:
        vertices, faces = mesh
        # vertices are (z, y, x) mm: plotly's x is the patient's right, y anterior, z superior
        figure.add_trace(go.Mesh3d(
            x=vertices[:, 2], y=vertices[:, 1], z=vertices[:, 0], i=faces[:, 0], j=faces[:, 1], k=faces[:, 2],
            color=_COLOURS.get(volume.modality, "#cccccc"), flatshading=False, hoverinfo="skip",
            lighting={"ambient": 0.45, "diffuse": 0.8, "specular": 0.15, "roughness": 0.6},
            name=f"{level:g}"))
    axis = {"showbackground": False, "showgrid": False, "zeroline": False, "showticklabels": False,
            "showspikes": False, "title": {"text": ""}}  # spikes: lines to the walls under the pointer
    figure.update_layout(
        # The top margin keeps the S above a tall surface clear of the plot's label, on a phone too
        template="none", margin={"l": 0, "r": 0, "t": 30, "b": 0}, height=420, showlegend=False,
        # The toolbar runs down the right edge, clear of the label; its "home" would leave the front view for
        # plotly's oblique default (the camera icon returns to the figure's own view).
        paper_bgcolor="rgba(0,0,0,0)", modebar={"orientation": "v", "remove": ["resetCameraDefault3d"]},
        scene=_scene(grid.shape, spacing, axis, mesh[0] if mesh is not None else None,
                     volume.meta.get("orientation_unknown", False)))
    return figure


LABEL_MARGIN = 0.06  # of the scan's longest side: from the surface to a side letter, and again to the scene's edge


def _scene(shape: tuple[int, ...], spacing: tuple[float, float, float], axis: dict,
           vertices: np.ndarray | None, sides_in_doubt: bool = False) -> dict:
    """The scene: each axis spans the scan's own extent in mm (plus room for the side letters) and the box
    has the proportions of those spans, so that the anatomy keeps its true shape whatever part of the scan
    the surface fills. Seen from the front (the patient's right on the viewer's left), head up, without
    perspective, so that the letters stay beside the surface; an orthographic view's size is the box's,
    scaled so that the width (right to left) and the height (foot to head) fit the 420-pixel-high plot, on a
    phone's screen too, a wide CT and a tall whole-body PET alike (factors found by eye on the examples).
    `sides_in_doubt`: the file states no orientation, and the side letters carry a "?"."""
    extent = [n * s for n, s in zip(shape, spacing, strict=True)]  # (z, y, x) mm
    pad = 2 * LABEL_MARGIN * max(extent)
    spans = [side + 2 * pad for side in extent]
    height, depth, width = (span / max(spans) for span in spans)
    scale = min(1.8 / width, 1.9 / height)
    ranges = {name: {**axis, "range": [-pad, side + pad], "autorange": False}
              for name, side in zip(("zaxis", "yaxis", "xaxis"), extent, strict=True)}
    return {"aspectmode": "manual", "aspectratio": {"x": width * scale, "y": depth * scale, "z": height * scale},
            **ranges, "annotations": (_side_labels(vertices, LABEL_MARGIN * max(extent), sides_in_doubt)
                                      if vertices is not None else []),
            "camera": {"eye": {"x": 0, "y": 2.0, "z": 0.4}, "up": {"x": 0, "y": 0, "z": 1},
                       "projection": {"type": "orthographic"}}}


def _side_labels(vertices: np.ndarray, margin: float, in_doubt: bool = False) -> list[dict]:
    """The patient's sides as letters `margin` mm beside the surface, R L S I (plotly x is RAS right, z superior):
    they turn with it, where an axis title's arrow would read left to right whichever way the axis points. Each
    with a "?" where they are `in_doubt` (a file that states no orientation)."""
    low, high = vertices.min(axis=0), vertices.max(axis=0)  # (z, y, x) mm
    middle = (low + high) / 2
    # The camera looks a little down from the front: S at the back and I at the front project clear of the surface.
    places = {"R": (middle[0], middle[1], high[2] + margin), "L": (middle[0], middle[1], low[2] - margin),
              "S": (high[0] + margin, low[1], middle[2]), "I": (low[0] - margin, high[1], middle[2])}
    return [{"x": float(x), "y": float(y), "z": float(z), "text": f"<b>{side}{'?' if in_doubt else ''}</b>",
             "showarrow": False,
             "font": {"size": 15, "color": "#888888"}} for side, (z, y, x) in places.items()]


def _surface(grid: np.ndarray, spacing: tuple[float, float, float],
             level: float) -> tuple[np.ndarray, np.ndarray] | None:
    """(vertices (V, 3) float32 mm, faces (F, 3) uint16/int32) of the isosurface, ≤ MAX_FACES; None if empty."""
    if not float(grid.min()) < level < float(grid.max()) or min(grid.shape) < 2:
        return None
    step = 1
    while True:
        vertices, faces, _, _ = marching_cubes(grid, level=level, spacing=spacing, step_size=step,
                                               allow_degenerate=False)
        if len(faces) <= MAX_FACES or step >= 8:
            break
        step += 1
    if len(faces) == 0:
        return None
    if len(faces) > MAX_FACES:  # a pathological (noise-like) surface even at step 8: keep an even subset
        faces = faces[:: math.ceil(len(faces) / MAX_FACES)]
    index_type = np.uint16 if len(vertices) <= np.iinfo(np.uint16).max else np.int32
    return vertices.astype(np.float32), faces.astype(index_type)
