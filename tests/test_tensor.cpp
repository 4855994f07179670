// Tensor basics and the autograd engine.
#include <gtest/gtest.h>

#include "dilatron/autograd.h"
#include "dilatron/philox.h"
#include "dilatron/random.h"
#include "dilatron/tensor.h"

using namespace dilatron;

TEST(Philox, MatchesKnownAnswerVector) {
  // Contract: counter 0, key 0 -> 6627e8d5 e169c58d bc57ac4c 9b00dbd8.
  const Philox4 r = philox4x32_10(Philox4{{0, 0, 0, 0}}, 0, 0);
  EXPECT_EQ(r.x[0], 0x6627e8d5u);
  EXPECT_EQ(r.x[1], 0xe169c58du);
  EXPECT_EQ(r.x[2], 0xbc57ac4cu);
  EXPECT_EQ(r.x[3], 0x9b00dbd8u);
}
