"""The dense CRF: the permutohedral lattice (and the exact filter that replaces it on small images), the separable
spatial Gaussian, the kernels, mean-field inference as a trainable layer (:class:`MeanFieldCRF`), the one-call
post-processing CRF (:class:`DenseCRF`) and the exact O(N²) reference (:mod:`.reference`, for tests on small
images). 2-D images with their RGB image by default; 3-D volumes, any guidance channels and a physical voxel spacing
as options (README: 3-D volumes)."""

from crfrnn_deeplab.crf.dense_crf import DenseCRF
from crfrnn_deeplab.crf.exact_filter import EXACT_FILTER_POINTS, exact_filter
from crfrnn_deeplab.crf.kernels import BilateralFilter, CRFKernels, Normalization, build_kernels
from crfrnn_deeplab.crf.lattice import PermutohedralLattice, build_lattice, lattice_gaussian
from crfrnn_deeplab.crf.mean_field import MeanFieldCRF, check_crf_inputs, fixed_crf, mean_field_step
from crfrnn_deeplab.crf.fast_inference import mean_field_inference
from crfrnn_deeplab.crf.sparse_rows import BlockedRows, SparseRows
from crfrnn_deeplab.crf.spatial import spatial_gaussian
from crfrnn_deeplab.crf.threads import set_inference_threads, thread_policy

__all__ = [
    "EXACT_FILTER_POINTS",
    "BilateralFilter",
    "BlockedRows",
    "CRFKernels",
    "DenseCRF",
    "MeanFieldCRF",
    "Normalization",
    "PermutohedralLattice",
    "SparseRows",
    "build_kernels",
    "build_lattice",
    "check_crf_inputs",
    "exact_filter",
    "fixed_crf",
    "lattice_gaussian",
    "mean_field_inference",
    "mean_field_step",
    "set_inference_threads",
    "spatial_gaussian",
    "thread_policy",
]
