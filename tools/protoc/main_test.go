package main

import (
	"bytes"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"

	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/descriptorpb"
)

func TestParseArgsForms(t *testing.T) {
	// prost-build's own form, then protoc's other spellings of the same.
	forms := [][]string{
		{"--include_imports", "--include_source_info", "-o", "out.pb", "-I", "proto", "-I", "more", "a.proto", "b.proto"},
		{"--include_imports", "--include_source_info", "-oout.pb", "-Iproto", "-Imore", "a.proto", "b.proto"},
		{"--include_imports", "--include_source_info", "--descriptor_set_out=out.pb", "--proto_path=proto", "--proto_path", "more", "a.proto", "b.proto"},
		{"--include_imports", "--include_source_info", "--descriptor_set_out", "out.pb", "-I", "proto" + string(filepath.ListSeparator) + "more", "a.proto", "b.proto"},
	}
	want := cmdline{
		includes:          []string{"proto", "more"},
		out:               "out.pb",
		includeImports:    true,
		includeSourceInfo: true,
		files:             []string{"a.proto", "b.proto"},
	}
	for _, args := range forms {
		got, err := parseArgs(args)
		if err != nil {
			t.Fatalf("%q: %v", args, err)
		}
		if !reflect.DeepEqual(got, want) {
			t.Errorf("%q:\n got %+v\nwant %+v", args, got, want)
		}
	}
}

func TestParseArgsDefaults(t *testing.T) {
	got, err := parseArgs([]string{"-o", "x.pb", "--experimental_allow_proto3_optional", "a.proto"})
	if err != nil {
		t.Fatal(err)
	}
	want := cmdline{includes: []string{"."}, out: "x.pb", files: []string{"a.proto"}}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("got %+v, want %+v", got, want)
	}
}

func TestParseArgsErrors(t *testing.T) {
	cases := []struct {
		args []string
		want string
	}{
		{[]string{"--cpp_out=x", "a.proto"}, "unknown option --cpp_out: supported are " + supported + "; " + installHint},
		{[]string{"-x", "a.proto"}, "unknown option -x: supported are " + supported + "; " + installHint},
		{[]string{"-o", "x.pb"}, "no .proto files given"},
		{[]string{"a.proto"}, "no output given: add -o FILE (this stand-in writes descriptor sets only; " + installHint + ")"},
		{[]string{"-o", "x.pb", "-o", "y.pb", "a.proto"}, "-o/--descriptor_set_out may be given only once"},
		{[]string{"a.proto", "-I"}, "-I needs a value"},
		{[]string{"--proto_path=", "a.proto"}, "--proto_path needs a non-empty value"},
		{[]string{"--include_imports=yes", "a.proto"}, "--include_imports takes no value"},
		{[]string{"-o", "x.pb", "", "a.proto"}, "an argument is the empty string; remove it"},
		{[]string{"@args.txt"}, "argument files (@args.txt) are not supported; pass the arguments directly, or " + installHint},
	}
	for _, c := range cases {
		_, err := parseArgs(c.args)
		if err == nil || err.Error() != c.want {
			t.Errorf("%q: got error %v, want %q", c.args, err, c.want)
		}
	}
}

func TestRunUnknownOptionExitsOne(t *testing.T) {
	var stdout, stderr bytes.Buffer
	if code := run([]string{"--rust_out=x", "a.proto"}, &stdout, &stderr); code != 1 {
		t.Fatalf("exit %d, want 1", code)
	}
	want := prefix + "unknown option --rust_out: supported are " + supported + "; " + installHint + "\n"
	if stderr.String() != want || stdout.Len() != 0 {
		t.Errorf("stderr %q stdout %q, want stderr %q", stderr.String(), stdout.String(), want)
	}
}

func TestRunVersion(t *testing.T) {
	var stdout, stderr bytes.Buffer
	if code := run([]string{"--version"}, &stdout, &stderr); code != 0 {
		t.Fatalf("exit %d: %s", code, stderr.String())
	}
	if stdout.String() != versionLine+"\n" {
		t.Errorf("got %q", stdout.String())
	}
}

// tree writes files (relative path -> content) under a new temp dir and
// makes it the working directory for the rest of the test.
func tree(t *testing.T, files map[string]string) string {
	t.Helper()
	dir := t.TempDir()
	for name, content := range files {
		p := filepath.Join(dir, filepath.FromSlash(name))
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(p, []byte(content), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	t.Chdir(dir)
	return dir
}

func TestVirtualPath(t *testing.T) {
	dir := tree(t, map[string]string{
		"proto/etcd/kv.proto":  "",
		"first/shared.proto":   "",
		"second/shared.proto":  "",
		"second/only.proto":    "",
		"outside/other.proto":  "",
		"proto/nested/x.proto": "",
	})
	cases := []struct {
		file     string
		includes []string
		want     string
	}{
		{"proto/etcd/kv.proto", []string{"proto"}, "etcd/kv.proto"},
		{"./proto//etcd/kv.proto", []string{"proto/"}, "etcd/kv.proto"},
		{filepath.Join(dir, "proto/etcd/kv.proto"), []string{"proto"}, "etcd/kv.proto"},
		{"proto/etcd/kv.proto", []string{"."}, "proto/etcd/kv.proto"},
		// The first include that contains the file names it.
		{"proto/nested/x.proto", []string{"proto", "proto/nested"}, "nested/x.proto"},
		{"proto/nested/x.proto", []string{"proto/nested", "proto"}, "x.proto"},
		// A name that is not a file here is a name under the proto path.
		{"etcd/kv.proto", []string{"proto"}, "etcd/kv.proto"},
		{"shared.proto", []string{"first", "second"}, "shared.proto"},
		{"google/protobuf/any.proto", []string{"proto"}, "google/protobuf/any.proto"},
		{"second/only.proto", []string{"first", "second"}, "only.proto"},
	}
	for _, c := range cases {
		got, err := virtualPath(c.file, c.includes)
		if err != nil || got != c.want {
			t.Errorf("virtualPath(%q, %q) = %q, %v; want %q", c.file, c.includes, got, err, c.want)
		}
	}

	errCases := []struct {
		file     string
		includes []string
		want     string
	}{
		{"outside/other.proto", []string{"proto"}, "outside/other.proto is in none of the include directories (proto): add -I with a directory that contains it"},
		{"second/shared.proto", []string{"first", "second"}, "second/shared.proto is shadowed: -I first comes first and has first/shared.proto too; pass that file instead, or put -I second first"},
		{"missing.proto", []string{"proto", "first"}, "missing.proto: no such file, neither as given nor under the proto path (proto, first)"},
		{"../x.proto", []string{"proto"}, "../x.proto: no such file"},
	}
	for _, c := range errCases {
		_, err := virtualPath(c.file, c.includes)
		if err == nil || err.Error() != c.want {
			t.Errorf("virtualPath(%q, %q): got error %v, want %q", c.file, c.includes, err, c.want)
		}
	}
}

func readSet(t *testing.T, path string) *descriptorpb.FileDescriptorSet {
	t.Helper()
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	set := &descriptorpb.FileDescriptorSet{}
	if err := proto.Unmarshal(data, set); err != nil {
		t.Fatal(err)
	}
	return set
}

func fileNames(set *descriptorpb.FileDescriptorSet) []string {
	var names []string
	for _, f := range set.File {
		names = append(names, f.GetName())
	}
	return names
}

var depTree = map[string]string{
	"p/a/base.proto": `syntax = "proto3";
package a;
import "google/protobuf/timestamp.proto";
// Base is imported by the others.
message Base { google.protobuf.Timestamp at = 1; optional string note = 2; }
`,
	"p/b/mid.proto": `syntax = "proto3";
package b;
import "a/base.proto";
message Mid { a.Base base = 1; }
`,
	"p/c/top.proto": `syntax = "proto3";
package c;
import "b/mid.proto";
import "a/base.proto";
message Top { b.Mid mid = 1; a.Base base = 2; }
service S { rpc Get(Top) returns (Top); }
`,
}

func TestCompileIncludeImportsOrder(t *testing.T) {
	tree(t, depTree)
	var stdout, stderr bytes.Buffer
	args := []string{"--include_imports", "--include_source_info", "-o", "out.pb", "-I", "p", "p/c/top.proto", "p/a/base.proto"}
	if code := run(args, &stdout, &stderr); code != 0 {
		t.Fatalf("exit %d: %s", code, stderr.String())
	}
	set := readSet(t, "out.pb")
	want := []string{"google/protobuf/timestamp.proto", "a/base.proto", "b/mid.proto", "c/top.proto"}
	if got := fileNames(set); !reflect.DeepEqual(got, want) {
		t.Errorf("files %q, want %q", got, want)
	}
	for _, f := range set.File {
		if len(f.GetSourceCodeInfo().GetLocation()) == 0 {
			t.Errorf("%s has no source info", f.GetName())
		}
	}
	base := set.File[1].MessageType[0]
	if got := base.Field[0].GetJsonName(); got != "at" {
		t.Errorf("json_name %q, want \"at\"", got)
	}
	if !base.Field[1].GetProto3Optional() {
		t.Errorf("note is not proto3 optional")
	}
	if got := set.File[1].GetSourceCodeInfo().GetLocation(); !strings.Contains(leading(got), " Base is imported by the others.\n") {
		t.Errorf("leading comment lost: %q", leading(got))
	}
}

func leading(locs []*descriptorpb.SourceCodeInfo_Location) string {
	var b strings.Builder
	for _, l := range locs {
		b.WriteString(l.GetLeadingComments())
	}
	return b.String()
}

func TestCompileWithoutImportsOrSourceInfo(t *testing.T) {
	tree(t, depTree)
	var stdout, stderr bytes.Buffer
	args := []string{"-o", "out.pb", "-I", "p", "p/c/top.proto", "p/b/mid.proto"}
	if code := run(args, &stdout, &stderr); code != 0 {
		t.Fatalf("exit %d: %s", code, stderr.String())
	}
	set := readSet(t, "out.pb")
	// Only the named files, still each after the ones it imports.
	want := []string{"b/mid.proto", "c/top.proto"}
	if got := fileNames(set); !reflect.DeepEqual(got, want) {
		t.Errorf("files %q, want %q", got, want)
	}
	for _, f := range set.File {
		if f.SourceCodeInfo != nil {
			t.Errorf("%s has source info without --include_source_info", f.GetName())
		}
	}
}

func TestCompileErrorsLikeProtoc(t *testing.T) {
	tree(t, map[string]string{
		"p/syntax.proto": "syntax = \"proto3\";\nmessage A {\n  string name = 1\n}\n",
		"p/bad.proto": `syntax = "proto3";
message A {
  string name = 1;
  int32 name = 2;
  Missing m = 3;
}
`,
	})
	var stdout, stderr bytes.Buffer
	code := run([]string{"-o", "out.pb", "-I", "p", "p/bad.proto"}, &stdout, &stderr)
	if code != 1 {
		t.Fatalf("exit %d, want 1", code)
	}
	want := "bad.proto:4:9: symbol \"A.name\" already defined at bad.proto:3:10\n"
	if stderr.String() != want {
		t.Errorf("stderr:\n%s\nwant:\n%s", stderr.String(), want)
	}
	if _, err := os.Stat("out.pb"); !os.IsNotExist(err) {
		t.Errorf("out.pb written despite errors (stat: %v)", err)
	}

	stderr.Reset()
	if code := run([]string{"-o", "out.pb", "-I", "p", "p/syntax.proto"}, &stdout, &stderr); code != 1 {
		t.Fatalf("exit %d, want 1", code)
	}
	if want := "syntax.proto:4:1: syntax error: expecting ';'\n"; stderr.String() != want {
		t.Errorf("stderr %q, want %q", stderr.String(), want)
	}
}

func TestCompileMissingImport(t *testing.T) {
	tree(t, map[string]string{
		"p/a.proto": "syntax = \"proto3\";\nimport \"nowhere/b.proto\";\n",
	})
	var stdout, stderr bytes.Buffer
	if code := run([]string{"-o", "out.pb", "-I", "p", "p/a.proto"}, &stdout, &stderr); code != 1 {
		t.Fatalf("exit %d, want 1", code)
	}
	want := "a.proto:2:8: import \"nowhere/b.proto\" is in none of the include directories (p)\n"
	if stderr.String() != want {
		t.Errorf("stderr %q, want %q", stderr.String(), want)
	}
}
