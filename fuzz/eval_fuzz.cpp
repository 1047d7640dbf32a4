// libFuzzer target for the benchmark readers and scorers (eval/score.cpp, eval/text_util.cpp): answer / question /
// ground-truth JSONL, the POPE label files, MME's <category>.txt, ScienceQA's problem JSON (both layouts), the
// MMBench TSV, TextVQA / GQA / SEED ground-truth JSON, and the VQAv2 / GQA upload writers. Every report that comes
// back is also rendered with score_to_json and score_to_text, as `eqat score` does.
//
// Input (fuzz_util.h): flags byte, then sections
//   0 answers.jsonl   1 questions (.jsonl)   2 ground truth A   3 ground truth B
// (flags & 15) % 14 picks the reader (below); bit 4 sets ScoreOptions::only_answered, bit 5 tolerate_torn_tail.
// Ground truth A/B are, per reader: shapes gt.jsonl; POPE coco_pope_random.json / coco_pope_popular.json; MME
// existence.txt / OCR.txt; ScienceQA problems.json; MMBench mmbench.tsv; TextVQA / GQA / SEED gt.json.
//
// eqat::InputError is the expected outcome for bad files. Findings: any other exception (a nlohmann type_error or
// out_of_range escaping, std::stoll's), a sanitizer report, a hang.
#include <cstdint>
#include <cstdlib>
#include <string>

#include "data/error.h"
#include "eval/score.h"
#include "eval/text_util.h"
#include "fuzz_util.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const fuzz::Input in = fuzz::split_input(data, size);
  const std::string& dir = fuzz::scratch_dir();
  const std::string answers = fuzz::write(dir, "answers.jsonl", in.get(0));
  const std::string questions = fuzz::write(dir, "questions.jsonl", in.get(1));
  eqat::ScoreOptions o;
  o.only_answered = in.flags & 16;
  const bool torn = in.flags & 32;
  const auto gt_file = [&](const std::string& name) { return fuzz::write(dir, name, in.get(2)); };
  const auto gt_dir = [&](const char* a, const char* b) {
    fuzz::write(dir, std::string("gt/") + a, in.get(2));
    if (in.has(3)) fuzz::write(dir, std::string("gt/") + b, in.get(3));
    return dir + "/gt";
  };

  try {
    eqat::ScoreReport r;
    switch ((in.flags & 15) % 14) {
      case 0:
        (void)eqat::read_answers(answers, torn);
        return 0;
      case 1:
        (void)eqat::read_questions(questions);
        return 0;
      case 2:
        (void)eqat::read_shapes_ground_truth(gt_file("gt.jsonl"));
        return 0;
      case 3:
        r = eqat::score_shapes(questions, gt_file("gt.jsonl"), answers, o);
        break;
      case 4:
        r = eqat::score_pope(gt_dir("coco_pope_random.json", "coco_pope_popular.json"), questions, answers, o);
        break;
      case 5:
        r = eqat::score_mme(gt_dir("existence.txt", "OCR.txt"), (in.flags & 32) ? questions : "", answers, o);
        break;
      case 6:
        r = eqat::score_scienceqa(gt_file("problems.json"), answers, o);
        break;
      case 7:
        r = eqat::score_mmbench(gt_file("mmbench.tsv"), answers, o);
        break;
      case 8:
        r = eqat::score_textvqa(gt_file("gt.json"), answers, o);
        break;
      case 9:
        r = eqat::score_gqa(gt_file("gt.json"), answers, o);
        break;
      case 10:
        r = eqat::score_seed(gt_file("gt.json"), answers, o);
        break;
      case 11:
        eqat::write_vqav2_upload(answers, dir + "/upload.json");
        return 0;
      case 12:
        eqat::write_gqa_predictions(answers, dir + "/upload.json");
        return 0;
      case 13:
        (void)eqat::read_tsv(gt_file("mmbench.tsv"));
        (void)eqat::base64_decode(in.get(1), "fuzz base64");
        return 0;
      default:
        return 0;
    }
    (void)eqat::score_to_json(r);
    (void)eqat::score_to_text(r);
  } catch (const eqat::InputError& e) {
    fuzz::rejected(e);
  }
  return 0;
}
