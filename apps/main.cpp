// eqat: one binary, git-style subcommands. Logs go to stderr, results to stdout.
// Exit codes: 0 ok, 2 bad input (one line naming the file/argument), 1 any other failure.
#include <c10/util/Exception.h>

#include <cstdio>
#include <cstdlib>
#include <iostream>
#include <map>
#include <string>

#include "args.h"
#include "commands.h"
#include "data/error.h"

namespace {

// OpenMP's idle threads wait passively (sleep on a futex) unless the user chose otherwise. libgomp's default is to
// spin for up to ~300k iterations after every parallel region; on a machine whose other cores are busy that spinning
// takes the core from the thread doing the work (RTN W4g128 with --threads 2 next to one busy core ran 15× slower
// than one thread). libgomp reads its environment in its own constructor, before main, so the default is set from
// the executable's .preinit_array, which the dynamic loader runs before any shared library's constructor. An
// explicit OMP_WAIT_POLICY or GOMP_SPINCOUNT is left as it is. Measured in bench/threads.sh.
void passive_openmp_wait(int, char**, char**) {
  if (std::getenv("OMP_WAIT_POLICY") == nullptr && std::getenv("GOMP_SPINCOUNT") == nullptr)
    ::setenv("OMP_WAIT_POLICY", "PASSIVE", 0);
}
__attribute__((section(".preinit_array"), used)) void (*const kPreinitOpenmp)(int, char**, char**) =
    passive_openmp_wait;

struct Entry {
  eqat::CommandFn fn;
  std::string summary;
};

std::map<std::string, Entry>& commands() {
  static std::map<std::string, Entry> m;
  return m;
}

void print_usage(std::FILE* f) {
  std::fprintf(f, "usage: eqat <command> [options]   (eqat <command> --help for details)\n\ncommands:\n");
  for (const auto& [name, e] : commands()) std::fprintf(f, "  %-12s %s\n", name.c_str(), e.summary.c_str());
}

}  // namespace

bool eqat::register_command(const std::string& name, CommandFn fn, const std::string& summary) {
  commands()[name] = Entry{fn, summary};
  return true;
}

int main(int argc, char** argv) {
  if (argc < 2) {
    print_usage(stderr);
    return 2;
  }
  const std::string cmd = argv[1];
  if (cmd == "--help" || cmd == "-h" || cmd == "help") {
    print_usage(stdout);
    return 0;
  }
  auto it = commands().find(cmd);
  if (it == commands().end()) {
    std::fprintf(stderr, "eqat: error: unknown command '%s' (see eqat --help)\n", cmd.c_str());
    return 2;
  }
  eqat::Argv args(argv + 2, argv + argc);
  try {
    return it->second.fn(args);
  } catch (const eqat::HelpShown&) {
    return 0;
  } catch (const eqat::InputError& e) {
    std::cout.flush();
    std::cerr << "eqat " << cmd << ": error: " << e.what() << std::endl;
    return 2;
  } catch (const c10::Error& e) {
    std::cout.flush();
    std::string msg = e.what_without_backtrace();
    if (auto nl = msg.find('\n'); nl != std::string::npos) msg = msg.substr(0, nl);
    std::cerr << "eqat " << cmd << ": internal error: " << msg << std::endl;
    return 1;
  } catch (const std::exception& e) {
    std::cout.flush();
    std::cerr << "eqat " << cmd << ": error: " << e.what() << std::endl;
    return 1;
  }
}
