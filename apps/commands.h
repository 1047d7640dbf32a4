// The eqat subcommands. Each takes the arguments after its name and returns the process exit code;
// bad input is reported by throwing eqat::InputError (main prints it and exits with 2).
#pragma once

#include <string>
#include <vector>

namespace eqat {

using Argv = std::vector<std::string>;
using CommandFn = int (*)(const Argv&);

// Self-registration: each apps/cmd_*.cpp registers its subcommands with a file-scope
//   static const bool registered = register_command("name", fn, "one-line summary");
// so adding a command touches no shared file.
bool register_command(const std::string& name, CommandFn fn, const std::string& summary);

// The embedded default model directory (models/ in the source tree, or $EQAT_DEFAULT_MODEL); empty when absent.
std::string default_model_dir();
// --model when given, else the default model, else an InputError explaining what to pass.
std::string resolve_model_dir(const std::string& flag_value, const std::string& command);

// --overwrite, shared by every command that writes an output (data/output.h says what it may replace).
inline constexpr const char* kOverwriteHelp =
    "replace an existing output of the same kind written by eqat (anything else is never replaced)";

}  // namespace eqat
