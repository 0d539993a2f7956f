// The team math of csrc/math/team_math.h (one sample spread over a CUDA warp), run here by a
// team of 32 threads with a barrier, in double precision, against the one-lane math of
// gaussian_math.h. The threads interleave as freely as a warp's lanes may, so a missing
// sync shows up as a wrong or flaky result.
#include <barrier>
#include <thread>
#include <vector>

#include "check.h"
#include "math/gaussian_math.h"
#include "math/team_math.h"
#include "random_matrices.h"

using namespace fusedgauss::math;

namespace {

constexpr int kLanes = 32;

/// What a team's lanes share: the barrier, and one exchange slot per lane for broadcast and
/// sum.
struct TeamState {
  std::barrier<> barrier{kLanes};
  double exchange[kLanes] = {};
};

class ThreadTeam {
 public:
  static constexpr int kSize = kLanes;
  ThreadTeam(int lane, TeamState& state) : lane_(lane), state_(state) {}

  int lane() const { return lane_; }
  void sync() const { state_.barrier.arrive_and_wait(); }
  template <typename T>
  T broadcast(T v, int src) const {
    state_.exchange[lane_] = v;
    sync();
    const T result = state_.exchange[src];
    sync();
    return result;
  }
  template <typename T>
  T sum(T v) const {
    state_.exchange[lane_] = v;
    sync();
    T s = 0;
    for (int l = 0; l < kSize; ++l) s += state_.exchange[l];
    sync();
    return s;
  }

 private:
  int lane_;
  TeamState& state_;
};

/// Runs body(team) in kLanes threads, one per lane.
template <typename Body>
void run_team(const Body& body) {
  TeamState state;
  std::vector<std::thread> lanes;
  for (int l = 0; l < kLanes; ++l) lanes.emplace_back([&, l] { body(ThreadTeam(l, state)); });
  for (std::thread& t : lanes) t.join();
}

/// The k x k row-major A copied to row stride ld (the team layout).
Matrix with_stride(int k, const Matrix& A, int ld) {
  Matrix out(k * ld, 0.0);
  for (int i = 0; i < k; ++i)
    for (int j = 0; j < k; ++j) out[i * ld + j] = A[i * k + j];
  return out;
}

int odd_stride(int k) { return k | 1; }

/// The team's Cholesky factor equals cholesky_in_place's, and ok is true in every lane.
void test_cholesky(int k) {
  const Matrix A = random_spd(k);
  Matrix expected = A;
  bool expected_ok = false;
  cholesky_in_place<1>(k, expected.data(), &expected_ok);
  const int ld = odd_stride(k);
  Matrix shared = with_stride(k, A, ld);
  bool lane_ok[kLanes] = {};
  run_team([&](const ThreadTeam& team) { lane_ok[team.lane()] = team_cholesky_in_place(team, k, shared.data(), ld); });
  for (int l = 0; l < kLanes; ++l) EXPECT_TRUE(lane_ok[l]);
  for (int i = 0; i < k; ++i)
    for (int j = 0; j <= i; ++j) EXPECT_CLOSE(shared[i * ld + j], expected[i * k + j], 1e-12);
}

/// A matrix with a negative last pivot: ok is false in every lane and that pivot is NaN.
void test_cholesky_rejects_indefinite(int k) {
  Matrix A = random_spd(k);
  A[(k - 1) * k + (k - 1)] = -1.0;
  const int ld = odd_stride(k);
  Matrix shared = with_stride(k, A, ld);
  bool lane_ok[kLanes];
  for (bool& ok : lane_ok) ok = true;
  run_team([&](const ThreadTeam& team) { lane_ok[team.lane()] = team_cholesky_in_place(team, k, shared.data(), ld); });
  for (int l = 0; l < kLanes; ++l) EXPECT_TRUE(!lane_ok[l]);
  EXPECT_TRUE(std::isnan(shared[(k - 1) * ld + (k - 1)]));
}

/// Products and solves with L and L^T, the log-determinant, ||z||^2 and Sigma^{-1} against
/// the one-lane math, for a distributed vector of kSlots slots per lane.
template <int kSlots>
void test_solves_and_inverse(int k) {
  const Matrix L = lower_factor(k, random_spd(k));
  std::vector<double> b(k);
  for (double& v : b) v = normal();

  std::vector<double> Lb(k, 0.0), LTb = b;
  add_lower_times<1>(k, L.data(), b.data(), Lb.data());
  lower_transposed_times_in_place<1>(k, L.data(), LTb.data());
  std::vector<double> z = b;
  solve_lower<1>(k, L.data(), z.data());
  std::vector<double> w = z;
  solve_lower_transposed<1>(k, L.data(), w.data());
  double squared_norm = 0;
  for (double v : z) squared_norm += v * v;
  double log_det = 0;
  sum_log_diagonal<1>(k, L.data(), &log_det);
  Matrix L_inv(k * k, 0.0), sigma_inv(k * k, 0.0);
  inverse_from_cholesky<1>(k, L.data(), L_inv.data(), sigma_inv.data());

  const int ld = odd_stride(k);
  const Matrix shared = with_stride(k, L, ld);
  Matrix X(k * ld, 0.0);
  std::vector<double> team_z(k), team_w(k), team_entries(k), team_Lb(k), team_LTb(k);
  double lane_norm[kLanes], lane_log_det[kLanes];
  run_team([&](const ThreadTeam& team) {
    double x[kSlots];
    for (int t = 0; t < kSlots; ++t) {
      const int64_t i = entry_index(team, t);
      x[t] = i < k ? b[i] : 0.0;
    }
    double products[kSlots] = {};
    team_add_lower_times(team, k, shared.data(), ld, x, products);
    for (int t = 0; t < kSlots; ++t) {
      if (entry_index(team, t) < k) team_Lb[entry_index(team, t)] = products[t];
    }
    team_lower_transposed_times(team, k, shared.data(), ld, x, products);
    for (int t = 0; t < kSlots; ++t) {
      if (entry_index(team, t) < k) team_LTb[entry_index(team, t)] = products[t];
    }
    team_solve_lower(team, k, shared.data(), ld, x);
    double zs[kSlots];
    for (int t = 0; t < kSlots; ++t) {
      zs[t] = x[t];
      const int64_t i = entry_index(team, t);
      if (i < k) team_z[i] = x[t];
    }
    lane_norm[team.lane()] = team_dot(team, k, zs, zs);
    team_solve_lower_transposed(team, k, shared.data(), ld, x);
    for (int t = 0; t < kSlots; ++t) {
      const int64_t i = entry_index(team, t);
      if (i < k) team_w[i] = x[t];
    }
    // Every lane reads every entry; lane 0 records them.
    for (int64_t i = 0; i < k; ++i) {
      const double entry = team_entry(team, x, i);
      if (team.lane() == 0) team_entries[i] = entry;
    }
    lane_log_det[team.lane()] = team_sum_log_diagonal(team, k, shared.data(), ld);
    team_invert_lower(team, k, shared.data(), ld, X.data(), ld);
  });
  for (int i = 0; i < k; ++i) {
    EXPECT_CLOSE(team_Lb[i], Lb[i], 1e-12);
    EXPECT_CLOSE(team_LTb[i], LTb[i], 1e-12);
    EXPECT_CLOSE(team_z[i], z[i], 1e-12);
    EXPECT_CLOSE(team_w[i], w[i], 1e-12);
    EXPECT_TRUE(team_entries[i] == team_w[i]);
  }
  for (int l = 0; l < kLanes; ++l) {
    EXPECT_CLOSE(lane_norm[l], squared_norm, 1e-12);
    EXPECT_TRUE(lane_norm[l] == lane_norm[0]);
    EXPECT_CLOSE(lane_log_det[l], log_det, 1e-12);
    EXPECT_TRUE(lane_log_det[l] == lane_log_det[0]);
  }
  for (int i = 0; i < k; ++i) {
    for (int j = 0; j <= i; ++j) {
      EXPECT_CLOSE(X[i * ld + j], L_inv[i * k + j], 1e-12);
      EXPECT_CLOSE(inverse_product_entry(k, X.data(), ld, i, j), sigma_inv[i * k + j], 1e-10);
      EXPECT_TRUE(inverse_product_entry(k, X.data(), ld, j, i) == inverse_product_entry(k, X.data(), ld, i, j));
    }
  }
}

/// The team's Cholesky backward equals cholesky_backward's, exactly symmetric.
void test_cholesky_backward(int k) {
  const Matrix L = lower_factor(k, random_spd(k));
  Matrix G(k * k);
  for (double& g : G) g = normal();
  Matrix expected(k * k);
  cholesky_backward<1>(k, G.data(), L.data(), expected.data());

  const int ld = odd_stride(k);
  const Matrix shared_L = with_stride(k, L, ld);
  // Only G's lower triangle is staged, as the kernel stages it; the rest is noise.
  Matrix W(k * ld);
  for (double& w : W) w = normal();
  for (int i = 0; i < k; ++i)
    for (int j = 0; j <= i; ++j) W[i * ld + j] = G[i * k + j];
  run_team([&](const ThreadTeam& team) { team_cholesky_backward(team, k, shared_L.data(), ld, W.data()); });
  for (int i = 0; i < k; ++i) {
    for (int j = 0; j < k; ++j) {
      EXPECT_CLOSE(W[i * ld + j], expected[i * k + j], 1e-10);
      EXPECT_TRUE(W[i * ld + j] == W[j * ld + i]);
    }
  }
}

}  // namespace

int main() {
  // 1 and 5: most lanes hold no entry; 32, 33 and 64: the edges of one and two slots.
  for (int k : {1, 5, 17, 32}) {
    test_cholesky(k);
    test_solves_and_inverse<1>(k);
  }
  for (int k : {33, 64}) {
    test_cholesky(k);
    test_solves_and_inverse<2>(k);
  }
  for (int k : {2, 17, 64}) test_cholesky_rejects_indefinite(k);
  for (int k : {1, 5, 17, 33, 64}) test_cholesky_backward(k);
  if (failures() == 0) std::printf("test_team_math: all passed\n");
  return failures() == 0 ? 0 : 1;
}
