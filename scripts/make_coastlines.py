r"""Write the coastline polylines that `metrics.geo.plot_world_samples` draws, from a TopoJSON
land file (Natural Earth's 1:110m land, public domain, as the npm package world-atlas
redistributes it):

  npm pack world-atlas@2.0.2 && tar xzf world-atlas-2.0.2.tgz
  python -m scripts.make_coastlines package/land-110m.json --out metrics/data/land_110m.npz

The output holds `lonlat` `float32 [N, 2]` (degrees), one polyline per TopoJSON arc with a
NaN row between arcs, so that one `plot` call draws them all.
"""

import json

import numpy as np

from scripts.common import argument_parser, npz_path, run


def decode_arcs(topology: dict) -> list[np.ndarray]:
    """The arcs of a TopoJSON topology as `[n, 2]` lon/lat arrays (delta-decoded and
    de-quantized when the topology has a `transform`)."""
    transform = topology.get("transform")
    arcs = []
    for arc in topology["arcs"]:
        pts = np.asarray(arc, np.float64)[:, :2]
        if transform:
            pts = np.cumsum(pts, axis=0) * transform["scale"] + transform["translate"]
        arcs.append(pts)
    return arcs


def split_at_antimeridian(arc: np.ndarray) -> list[np.ndarray]:
    """An arc cut where it jumps across ±180° longitude (else a line crosses the map)."""
    jumps = np.flatnonzero(np.abs(np.diff(arc[:, 0])) > 180.0) + 1
    return np.split(arc, jumps)


def polylines(arcs: list[np.ndarray]) -> np.ndarray:
    """Arcs (cut at the antimeridian) joined into one `float32 [N, 2]` array, a NaN row
    after each piece."""
    gap = np.full((1, 2), np.nan)
    pieces = [p for a in arcs for p in split_at_antimeridian(a)]
    return np.concatenate([p for a in pieces for p in (a, gap)]).astype(np.float32)


def main(argv: list[str]) -> None:
    p = argument_parser("make_coastlines", __doc__)
    p.add_argument("topojson", help="TopoJSON land file, e.g. land-110m.json")
    p.add_argument("--out", required=True, help="output .npz")
    args = p.parse_args(argv[1:])
    args.out = npz_path(args.out)  # the name numpy writes
    with open(args.topojson) as f:
        lonlat = polylines(decode_arcs(json.load(f)))
    np.savez_compressed(args.out, lonlat=lonlat)
    print(f"wrote {int(np.isnan(lonlat[:, 0]).sum())} polylines, {len(lonlat)} rows to {args.out}")


if __name__ == "__main__":
    run(main)
