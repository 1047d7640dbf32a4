// eqat: one binary, git-style subcommands. Logs go to stderr, results to stdout.
// Exit codes: 0 ok, 2 bad input (one line naming the file/argument), 1 any other failure.
#include <c10/util/Exception.h>

#include <cstdio>
#include <iostream>
#include <map>
#include <string>

#include "args.h"
#include "commands.h"
#include "data/error.h"

namespace {

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
