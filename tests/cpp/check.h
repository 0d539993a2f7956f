#pragma once
// A minimal check macro for the C++ tests: counts failures, and main() returns their number.
#include <cmath>
#include <cstdio>

inline int& failures() {
  static int count = 0;
  return count;
}

#define EXPECT_CLOSE(actual, expected, tol)                                                   \
  do {                                                                                       \
    const double a_ = (actual), e_ = (expected);                                             \
    if (!(std::fabs(a_ - e_) <= (tol) * (1.0 + std::fabs(e_)))) {                            \
      std::printf("%s:%d: %s = %.17g, expected %.17g\n", __FILE__, __LINE__, #actual, a_, e_); \
      ++failures();                                                                          \
    }                                                                                        \
  } while (0)

#define EXPECT_TRUE(condition)                                                 \
  do {                                                                   \
    if (!(condition)) {                                                  \
      std::printf("%s:%d: failed: %s\n", __FILE__, __LINE__, #condition); \
      ++failures();                                                      \
    }                                                                    \
  } while (0)
