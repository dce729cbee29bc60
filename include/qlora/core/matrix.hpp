// Row-major Eigen aliases used by every public API.
//
// A weight is [N, K] = [out, in], the layout of nn.Linear and of GGUF rows; activations are
// [M, K] with M = batch x sequence. Public functions never take a column-major MatrixXf.
#pragma once

#include <Eigen/Core>

namespace qlora {

using RowMatrixF = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
using RowMatrixD = Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
using MapRowMatrixF = Eigen::Map<RowMatrixF>;
using ConstMapRowMatrixF = Eigen::Map<const RowMatrixF>;
using RefRowMatrixF = Eigen::Ref<RowMatrixF>;
using ConstRefRowMatrixF = Eigen::Ref<const RowMatrixF>;
using VectorF = Eigen::VectorXf;
using RowVectorF = Eigen::Matrix<float, 1, Eigen::Dynamic, Eigen::RowMajor>;

}  // namespace qlora
