// Command protoc is kekd's stand-in for protoc on machines that lack one.
//
// It implements the part of protoc's command line that prost-build and
// tonic-prost-build use: compile .proto files into a FileDescriptorSet
// (-o/--descriptor_set_out) with --include_imports and
// --include_source_info. Compilation is done by
// github.com/bufbuild/protocompile; the well-known google/protobuf imports
// come with it, as they come with protoc. Anything else (code generators,
// --decode, ...) is refused with a message that names the real protoc.
//
// tools/protoc/protoc (the script cargo runs through $PROTOC) builds this
// program only when no real protoc is on PATH; see tools/protoc/README.md.
package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"strings"

	"github.com/bufbuild/protocompile"
	"github.com/bufbuild/protocompile/linker"
	"github.com/bufbuild/protocompile/options"
	"github.com/bufbuild/protocompile/protoutil"
	"github.com/bufbuild/protocompile/reporter"
	"github.com/bufbuild/protocompile/wellknownimports"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protoreflect"
	"google.golang.org/protobuf/types/descriptorpb"
)

// versionLine is what --version prints. protocompile v0.14 accepts the
// language of protoc 27 (proto2, proto3, edition 2023); tools that parse
// "libprotoc X.Y" get that, people get the rest of the line.
const versionLine = "libprotoc 27.0 (kekd's Go stand-in: github.com/bufbuild/protocompile v0.14.1)"

// prefix starts every message that is about the command line rather than
// about a .proto file, so a build log shows which protoc spoke.
const prefix = "protoc (kekd stand-in): "

const supported = "-I/--proto_path, -o/--descriptor_set_out, --include_imports, " +
	"--include_source_info, --retain_options, --experimental_allow_proto3_optional, --version"

const installHint = "for anything else install the real protoc (apt-get install protobuf-compiler)"

func main() {
	os.Exit(run(os.Args[1:], os.Stdout, os.Stderr))
}

// run is main without the process: it returns the exit status (0 ok, 1 any
// failure, as protoc does).
func run(args []string, stdout, stderr io.Writer) int {
	opts, err := parseArgs(args)
	if err != nil {
		fmt.Fprintln(stderr, prefix+err.Error())
		return 1
	}
	switch {
	case opts.help:
		fmt.Fprintf(stdout, "usage: protoc [-I DIR]... -o FILE [--include_imports] [--include_source_info] FILE.proto...\n"+
			"kekd's stand-in for protoc: writes FileDescriptorSets only.\nsupported options: %s\n", supported)
		return 0
	case opts.version:
		fmt.Fprintln(stdout, versionLine)
		return 0
	}
	if err := compile(opts, stderr); err != nil {
		if !errors.Is(err, errReported) {
			fmt.Fprintln(stderr, prefix+err.Error())
		}
		return 1
	}
	return 0
}

// cmdline is what parseArgs understood.
type cmdline struct {
	includes          []string
	out               string
	includeImports    bool
	includeSourceInfo bool
	retainOptions     bool
	version           bool
	help              bool
	files             []string
}

// parseArgs reads protoc's syntax: "-Xvalue" or "-X value" for the short
// options, "--name=value" or "--name value" for the long ones.
func parseArgs(args []string) (cmdline, error) {
	var c cmdline
	for i := 0; i < len(args); i++ {
		arg := args[i]
		if arg == "" {
			return c, errors.New("an argument is the empty string; remove it")
		}
		if !strings.HasPrefix(arg, "-") {
			if strings.HasPrefix(arg, "@") {
				return c, fmt.Errorf("argument files (%s) are not supported; pass the arguments directly, or %s", arg, installHint)
			}
			c.files = append(c.files, arg)
			continue
		}

		var name, value string
		hasValue := false
		if strings.HasPrefix(arg, "--") {
			name, value, hasValue = strings.Cut(arg, "=")
		} else {
			name = arg[:2]
			if len(arg) > 2 {
				value, hasValue = arg[2:], true
			}
		}

		switch name {
		case "-I", "--proto_path", "-o", "--descriptor_set_out":
			if !hasValue {
				if i+1 >= len(args) {
					return c, fmt.Errorf("%s needs a value", name)
				}
				i++
				value = args[i]
			}
			if value == "" {
				return c, fmt.Errorf("%s needs a non-empty value", name)
			}
			if name == "-I" || name == "--proto_path" {
				// protoc splits a proto path on the OS list separator.
				for _, dir := range filepath.SplitList(value) {
					if dir == "" {
						return c, fmt.Errorf("%s %q has an empty directory in it", name, value)
					}
					c.includes = append(c.includes, dir)
				}
				continue
			}
			if c.out != "" {
				return c, errors.New("-o/--descriptor_set_out may be given only once")
			}
			c.out = value
		case "--include_imports", "--include_source_info", "--retain_options",
			"--experimental_allow_proto3_optional", "--version", "-h", "--help":
			if hasValue {
				return c, fmt.Errorf("%s takes no value", name)
			}
			switch name {
			case "--include_imports":
				c.includeImports = true
			case "--include_source_info":
				c.includeSourceInfo = true
			case "--retain_options":
				c.retainOptions = true
			case "--experimental_allow_proto3_optional":
				// proto3 optional is always accepted; protoc keeps the
				// flag for old build scripts, and so do we.
			case "--version":
				c.version = true
			default:
				c.help = true
			}
		default:
			return c, fmt.Errorf("unknown option %s: supported are %s; %s", name, supported, installHint)
		}
	}
	if c.version || c.help {
		return c, nil
	}
	if len(c.files) == 0 {
		return c, errors.New("no .proto files given")
	}
	if c.out == "" {
		return c, fmt.Errorf("no output given: add -o FILE (this stand-in writes descriptor sets only; %s)", installHint)
	}
	if len(c.includes) == 0 {
		// As protoc: without -I, the current directory is the proto path.
		c.includes = []string{"."}
	}
	return c, nil
}

// errReported means the errors were already printed, file by file.
var errReported = errors.New("errors reported")

// compile compiles c.files and writes the descriptor set to c.out.
func compile(c cmdline, stderr io.Writer) error {
	names := make([]string, 0, len(c.files))
	for _, f := range c.files {
		name, err := virtualPath(f, c.includes)
		if err != nil {
			return err
		}
		names = append(names, name)
	}

	// Positions name files as imports do (relative to the proto path), as
	// protoc's messages do.
	report := func(kind string, e reporter.ErrorWithPos) {
		pos := e.GetPosition()
		if pos.Line > 0 {
			fmt.Fprintf(stderr, "%s:%d:%d: %s%v\n", pos.Filename, pos.Line, pos.Col, kind, e.Unwrap())
		} else {
			fmt.Fprintf(stderr, "%s: %s%v\n", pos.Filename, kind, e.Unwrap())
		}
	}
	sources := &protocompile.SourceResolver{ImportPaths: c.includes}
	fromDisk := protocompile.ResolverFunc(func(name string) (protocompile.SearchResult, error) {
		found, err := sources.FindFileByPath(name)
		if errors.Is(err, fs.ErrNotExist) {
			err = fmt.Errorf("import %q is in none of the include directories (%s)", name, strings.Join(c.includes, ", "))
		}
		return found, err
	})
	errorCount := 0
	compiler := protocompile.Compiler{
		// After the include directories, the google/protobuf files that
		// come with protocompile, as protoc falls back on its own.
		Resolver: wellknownimports.WithStandardImports(fromDisk),
		Reporter: reporter.NewReporter(
			func(e reporter.ErrorWithPos) error {
				errorCount++
				report("", e)
				return nil // go on: report every error, as protoc does
			},
			func(e reporter.ErrorWithPos) { report("warning: ", e) },
		),
		// Compile files in a fixed order; the builds this serves are small.
		MaxParallelism: 1,
	}
	if c.includeSourceInfo {
		compiler.SourceInfoMode = protocompile.SourceInfoStandard
	}
	files, err := compiler.Compile(context.Background(), names...)
	if err != nil {
		var pos reporter.ErrorWithPos
		switch {
		case errorCount > 0 && errors.Is(err, reporter.ErrInvalidSource):
			return errReported
		case errors.As(err, &pos):
			report("", pos)
			return errReported
		default:
			return err
		}
	}

	set, err := descriptorSet(files, c.includeImports, c.includeSourceInfo, c.retainOptions)
	if err != nil {
		return err
	}
	data, err := proto.MarshalOptions{Deterministic: true}.Marshal(set)
	if err != nil {
		return fmt.Errorf("cannot encode the descriptor set: %w", err)
	}
	if err := os.WriteFile(c.out, data, 0o666); err != nil {
		return fmt.Errorf("cannot write the descriptor set: %w", err)
	}
	return nil
}

// descriptorSet lays the compiled files out as protoc does: every file
// after the files it imports, each once; without includeImports only the
// files named on the command line.
func descriptorSet(files linker.Files, includeImports, sourceInfo, retainOptions bool) (*descriptorpb.FileDescriptorSet, error) {
	seen := map[string]bool{}
	if !includeImports {
		named := map[string]bool{}
		for _, f := range files {
			named[f.Path()] = true
		}
		for _, f := range files {
			imports := f.Imports()
			for i := 0; i < imports.Len(); i++ {
				if dep := imports.Get(i).Path(); !named[dep] {
					seen[dep] = true
				}
			}
		}
	}

	set := &descriptorpb.FileDescriptorSet{}
	var visit func(fd protoreflect.FileDescriptor) error
	visit = func(fd protoreflect.FileDescriptor) error {
		if seen[fd.Path()] {
			return nil
		}
		seen[fd.Path()] = true
		imports := fd.Imports()
		for i := 0; i < imports.Len(); i++ {
			if err := visit(imports.Get(i).FileDescriptor); err != nil {
				return err
			}
		}
		fdp := protoutil.ProtoFromFileDescriptor(fd)
		if !retainOptions {
			stripped, err := options.StripSourceRetentionOptionsFromFile(fdp)
			if err != nil {
				return fmt.Errorf("%s: cannot strip source-retention options: %w", fd.Path(), err)
			}
			fdp = stripped
		}
		if !sourceInfo && fdp.SourceCodeInfo != nil {
			fdp = proto.CloneOf(fdp)
			fdp.SourceCodeInfo = nil
		}
		set.File = append(set.File, fdp)
		return nil
	}
	for _, f := range files {
		if err := visit(f); err != nil {
			return nil, err
		}
	}
	return set, nil
}

// virtualPath maps a file named on the command line to its name relative to
// the proto path, as protoc does: a file that exists on disk is named
// relative to the first include directory that contains it (and must not be
// shadowed by the same name in an earlier one); any other name is taken as
// already relative to the proto path.
func virtualPath(file string, includes []string) (string, error) {
	if _, err := os.Stat(file); err != nil {
		if !errors.Is(err, os.ErrNotExist) {
			return "", fmt.Errorf("cannot read %s: %w", file, err)
		}
		name := filepath.ToSlash(filepath.Clean(file))
		if filepath.IsAbs(file) || name == ".." || strings.HasPrefix(name, "../") {
			return "", fmt.Errorf("%s: no such file", file)
		}
		if !inProtoPath(name, includes) && !strings.HasPrefix(name, "google/protobuf/") {
			return "", fmt.Errorf("%s: no such file, neither as given nor under the proto path (%s)",
				file, strings.Join(includes, ", "))
		}
		// Not on disk as given: a name under the proto path, or one of
		// the bundled google/protobuf files.
		return name, nil
	}

	abs, err := filepath.Abs(file)
	if err != nil {
		return "", fmt.Errorf("cannot resolve %s: %w", file, err)
	}
	for k, inc := range includes {
		absInc, err := filepath.Abs(inc)
		if err != nil {
			return "", fmt.Errorf("cannot resolve -I %s: %w", inc, err)
		}
		rel, err := filepath.Rel(absInc, abs)
		if err != nil || rel == "." || rel == ".." || strings.HasPrefix(rel, ".."+string(filepath.Separator)) {
			continue
		}
		for _, earlier := range includes[:k] {
			if exists(filepath.Join(earlier, rel)) {
				return "", fmt.Errorf("%s is shadowed: -I %s comes first and has %s too; "+
					"pass that file instead, or put -I %s first", file, earlier, filepath.Join(earlier, rel), inc)
			}
		}
		return filepath.ToSlash(rel), nil
	}
	return "", fmt.Errorf("%s is in none of the include directories (%s): add -I with a directory that contains it",
		file, strings.Join(includes, ", "))
}

// inProtoPath tells whether some include directory has the file name.
func inProtoPath(name string, includes []string) bool {
	for _, inc := range includes {
		if exists(filepath.Join(inc, filepath.FromSlash(name))) {
			return true
		}
	}
	return false
}

func exists(path string) bool {
	info, err := os.Stat(path)
	return err == nil && !info.IsDir()
}
