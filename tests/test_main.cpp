// Shared GoogleTest main: fixed seed, one intra-op thread (ctest -j2 on 2 cores must not oversubscribe).
#include <ATen/Context.h>
#include <ATen/Parallel.h>
#include <gtest/gtest.h>

int main(int argc, char** argv) {
  ::testing::InitGoogleTest(&argc, argv);
  at::manual_seed(0);
  at::set_num_threads(1);
  return RUN_ALL_TESTS();
}
