// The eqat subcommands. Each takes the arguments after its name and returns the process exit code;
// bad input is reported by throwing eqat::InputError (main prints it and exits with 2).
#pragma once

#include <string>
#include <vector>

namespace eqat {

using Argv = std::vector<std::string>;

int cmd_ask(const Argv& args);
int cmd_generate(const Argv& args);
int cmd_preprocess(const Argv& args);
int cmd_inspect(const Argv& args);
int cmd_convert(const Argv& args);

// The embedded default model directory (models/ in the source tree, or $EQAT_DEFAULT_MODEL); empty when absent.
std::string default_model_dir();
// --model when given, else the default model, else an InputError explaining what to pass.
std::string resolve_model_dir(const std::string& flag_value, const std::string& command);

// Fails early (before any work) when an output path's directory does not exist; `flag` names the argument.
void check_output_path(const std::string& path, const std::string& flag);

}  // namespace eqat
