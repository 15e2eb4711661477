"""The picture: a 2-D t-SNE embedding of the tiles' encoder features, coloured by dataset (as the study's figure).

t-SNE (scikit-learn) runs on at most ``per_dataset`` tiles of each dataset, after PCA to 50 dimensions (the usual
preprocessing, and what keeps it a matter of seconds). Closeness still comes from the table; the picture shows
*how* the datasets overlap.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np


def embed_2d(embeddings: dict[str, np.ndarray], per_dataset: int, seed: int) -> dict[str, np.ndarray]:
    """Dataset name -> n×2 t-SNE coordinates of a seeded subset of its tiles (empty when too few tiles overall)."""
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE

    rng = np.random.default_rng(seed)
    picks = {n: e[rng.permutation(len(e))[:per_dataset]] for n, e in embeddings.items()}
    points = np.concatenate(list(picks.values())) if picks else np.zeros((0, 2))
    if len(points) < 5:
        return {n: np.zeros((0, 2)) for n in embeddings}
    reduced = PCA(n_components=min(50, *points.shape), random_state=seed).fit_transform(points)
    coords = TSNE(n_components=2, perplexity=min(30.0, (len(points) - 1) / 3), init="pca", random_state=seed,
                  ).fit_transform(reduced)
    out, start = {}, 0
    for name, part in picks.items():
        out[name] = coords[start:start + len(part)]
        start += len(part)
    return out


def save_figure(coords: dict[str, np.ndarray], path: Path, title: str) -> None:
    """Scatter the coordinates, one colour per dataset (the first one, the target, drawn last and on top)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 6), dpi=120)
    names = list(coords)
    colours = plt.get_cmap("tab10")
    for i, name in reversed(list(enumerate(names))):
        xy = coords[name]
        ax.scatter(xy[:, 0], xy[:, 1], s=9 if i else 12, alpha=0.6 if i else 0.8, color=colours(i % 10),
                   label=f"{name} (target)" if i == 0 else name, edgecolors="none")
    handles, labels = ax.get_legend_handles_labels()
    ax.legend(handles[::-1], labels[::-1], loc="best", fontsize=8, markerscale=2)
    ax.set_title(title, fontsize=10)
    ax.set_xticks([]), ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
